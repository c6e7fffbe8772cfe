"""``loong plan`` against independent counts: parameters, sharding, saved bytes, FLOPs.

Paper-size models are built on the meta device only; the measured checks run a tiny model on CPU.
"""

from __future__ import annotations

import argparse
import json
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from loong.lm.model import VideoLM, VideoLMConfig, rope_cos_sin
from loong.lm.presets import lm_preset
from loong.lm.vocab import VocabConfig
from loong.plan import (
    BF16,
    FP32,
    add_plan_parser,
    block_activation_bytes,
    head_activation_bytes,
    plan_memory,
    run_plan,
)


def _tiny_config() -> VideoLMConfig:
    """Grouped-query attention (4 query heads over 2 key/value heads), an untied head."""
    return VideoLMConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=96,
        max_seq_len=64,
        vocab=VocabConfig(text_vocab_size=100, video_vocab_size=64, n_special=10),
    )


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def _plan_cli(argv: list[str]) -> int:
    commands = argparse.ArgumentParser().add_subparsers(dest="command")
    add_plan_parser(commands)
    return run_plan(commands.choices["plan"].parse_args(argv))


@pytest.mark.parametrize("preset", ["loong-700m", "loong-3b", "loong-7b"])
def test_parameter_counts_equal_the_meta_models(preset):
    config = lm_preset(preset)
    with torch.device("meta"):
        model = VideoLM(config)
    plan = plan_memory(config)
    assert plan.params_total == sum(p.numel() for p in model.parameters())
    embeddings = model.tok_embeddings.weight.numel() + model.output.weight.numel()
    assert plan.params_non_embedding == plan.params_total - embeddings


@pytest.mark.parametrize("gpus", [2, 8, 64])
def test_fsdp_shards_weights_grads_and_moments_over_the_gpus(gpus):
    config = lm_preset("loong-7b")
    ddp = plan_memory(config, gpus=gpus, parallel="ddp")
    fsdp = plan_memory(config, gpus=gpus, parallel="fsdp")
    for field in ("master_weights_gib", "grads_gib", "optimizer_gib"):
        assert getattr(fsdp, field) == pytest.approx(getattr(ddp, field) / gpus, rel=1e-12)
    assert ddp.master_weights_gib == pytest.approx(4 * ddp.params_total / 2**30)
    assert ddp.optimizer_gib == pytest.approx(2 * ddp.master_weights_gib)
    assert ddp.unsharded_grads_gib == 0 and fsdp.unsharded_grads_gib > 0
    # one block gathered at a time (plus the root), far less than the whole bf16 model
    assert fsdp.compute_weights_gib < ddp.compute_weights_gib / 2


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_checkpointing_lowers_activations_which_grow_linearly_with_micro_batch(parallel):
    config = lm_preset("loong-3b")
    plans = [plan_memory(config, micro_batch=b, parallel=parallel) for b in (1, 2, 4)]
    for plan in plans:
        assert plan.activations_checkpointed_gib < plan.activations_gib / 2
        states = (
            plan.master_weights_gib
            + plan.compute_weights_gib
            + plan.grads_gib
            + plan.unsharded_grads_gib
            + plan.optimizer_gib
        )
        assert plan.total_gib == pytest.approx(states + plan.activations_gib)
        assert plan.total_checkpointed_gib == pytest.approx(
            states + plan.activations_checkpointed_gib
        )
        assert plan.fits == (plan.total_gib <= 0.9 * 80)
    for b, plan in zip((2, 4), plans[1:], strict=True):
        assert plan.activations_gib == pytest.approx(b * plans[0].activations_gib)
        assert plan.activations_checkpointed_gib == pytest.approx(
            b * plans[0].activations_checkpointed_gib
        )


@pytest.mark.parametrize(
    ("weights", "residual_bytes"), [(torch.bfloat16, BF16), (torch.float32, FP32)]
)
def test_activation_bytes_equal_what_autograd_saves(weights, residual_bytes):
    """bf16 weights stand for FSDP's gathered bf16 parameters; fp32 weights under autocast for
    DDP. Saved bytes at batch 2 less batch 1 leave out the weights and RoPE tables."""
    config = _tiny_config()
    length = 32
    torch.manual_seed(0)
    model = VideoLM(config).to(weights)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if weights == torch.float32 else None
    cos, sin = rope_cos_sin(torch.arange(length), config.head_dim, config.rope_theta, weights)

    def block_forward(b: int) -> None:
        x = torch.randn(b, length, config.dim, dtype=weights, requires_grad=True)
        with autocast or nullcontext():
            model.layers[0](x, cos, sin, None, None, torch.arange(length))

    def loss_forward(b: int) -> None:
        token_ids = torch.randint(0, config.vocab_size, (b, length))
        targets = torch.randint(0, config.vocab_size, (b * length,))
        with autocast or nullcontext():
            logits = model(token_ids)  # (B, L, V)
        F.cross_entropy(logits.flatten(0, 1).float(), targets)

    per_block = block_activation_bytes(config, residual_bytes)
    assert (_saved_bytes(lambda: block_forward(2)) - _saved_bytes(lambda: block_forward(1))) == (
        length * per_block
    )
    # The bf16 logits and their fp32 copy (6·V) are alive during the loss but not saved.
    per_token = (
        config.n_layers * per_block
        + head_activation_bytes(config, residual_bytes)
        - 6 * config.vocab_size
    )
    assert (_saved_bytes(lambda: loss_forward(2)) - _saved_bytes(lambda: loss_forward(1))) == (
        length * per_token
    )


def test_flops_equal_a_count_of_the_tiny_models_matmuls():
    config = _tiny_config()
    batch, length = 2, 16
    with torch.device("meta"):
        model = VideoLM(config)
        token_ids = torch.zeros(batch, length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(token_ids).float().sum().backward()
    linear_flops = counter.get_flop_counts()["Global"][torch.ops.aten.mm]

    # by hand: the Linear shapes (in, out) of a block, then the head
    d, e, f, v = config.dim, config.head_dim, config.hidden_dim, config.vocab_size
    n, m = config.n_heads, config.kv_heads
    block = [(d, n * e), (d, m * e), (d, m * e), (n * e, d), (d, f), (d, f), (f, d)]
    weights = config.n_layers * sum(i * o for i, o in block) + d * v
    assert linear_flops == 3 * 2 * weights * batch * length  # forward + 2 × forward backward

    # causal attention: query i meets keys 0..i; QKᵀ and AV each 2·E FLOPs a pair and head
    pairs = sum(i + 1 for i in range(length))
    attention = 3 * config.n_layers * n * pairs * 2 * (2 * e)
    plan = plan_memory(config, gpus=3, seq_len=length, micro_batch=batch)
    assert plan.flops_per_sequence == linear_flops // batch + attention
    assert plan.flops_per_step == 3 * batch * plan.flops_per_sequence
    assert plan.tokens_per_step == 3 * batch * length
    blocks_forward = (linear_flops // batch - 3 * 2 * d * v * length) // 3 + attention // 3
    assert plan.recompute_flops_per_step == 3 * batch * blocks_forward


def test_cli_prints_a_table_naming_the_preset(capsys):
    argv = ["--preset", "loong-7b", "--gpus", "8", "--gpu-mem", "80", "--seq", "4352"]
    assert _plan_cli(argv) == 0
    table = capsys.readouterr().out
    assert "loong-7b" in table and "fsdp" in table
    assert "activations" in table and "fits in 72.0 GiB" in table


def test_cli_json_is_valid_and_matches_the_python_plan(capsys):
    assert _plan_cli(["--preset", "loong-700m", "--parallel", "ddp", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plan = plan_memory(lm_preset("loong-700m"), parallel="ddp")
    assert out["preset"] == "loong-700m"
    assert out["total_gib"] == pytest.approx(plan.total_gib)
    assert out["flops_per_step"] == plan.flops_per_step


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "loong-9b"], "choose one of"),
        (["--gpus", "0"], r"gpus \(--gpus\) must be 1 or more"),
        (["--seq", "-5"], r"seq_len \(--seq\) must be 1 or more"),
        (["--micro-batch", "0"], r"--micro-batch"),
        (["--gpu-mem", "0"], r"--gpu-mem"),
        (["--seq", "9000"], r"pass --seq 4608 or less"),
    ],
)
def test_bad_input_raises_a_value_error_naming_the_fix(argv, message):
    with pytest.raises(ValueError, match=message):
        _plan_cli(argv)


def test_unknown_parallel_mode_raises_a_value_error_listing_the_choices():
    with pytest.raises(ValueError, match=r"one of \('ddp', 'fsdp'\)"):
        plan_memory(lm_preset("loong-700m"), parallel="zero2")
