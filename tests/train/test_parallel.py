"""Parallelism applied from outside: DDP and FSDP2 on two CPU processes train like one process
with the same global batch; activation checkpointing changes neither loss nor gradients."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import run_ranks, tiny_lm

from loong.lm.model import rope_cos_sin
from loong.train import parallel
from loong.train.dist import all_reduce_mean, rank
from loong.train.parallel import (
    ParallelConfig,
    autocast,
    clip_grad_norm_,
    cpu_has_bf16,
    export_state_dict,
    no_gradient_sync,
    parallelize,
    unwrap,
)
from loong.video_tokenizer.causal_conv import StreamCache
from loong.video_tokenizer.discriminator import Discriminator3D, DiscriminatorConfig

CPU = torch.device("cpu")
ROWS, ACCUM, SEQ, STEPS = 4, 2, 12, 3  # a step: ACCUM micro-batches of ROWS sequences
MAX_NORM = 0.05  # small enough that every step clips


def batch(step: int, micro: int, vocab_size: int) -> torch.Tensor:
    """The global micro-batch ``(ROWS, SEQ)`` of a step, the same in every process."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    return torch.randint(vocab_size, (ROWS, SEQ), generator=g)


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)  # (B, L, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def train(model: torch.nn.Module, rows: slice, steps: int = STEPS) -> list[tuple[float, float]]:
    """(global loss, gradient norm) of each step; this process trains on ``rows`` of each
    micro-batch and the ranks' losses are averaged, as DDP averages their gradients."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    vocab_size = unwrap(model).config.vocab_size
    out = []
    for step in range(steps):
        total = 0.0
        for micro in range(ACCUM):
            # gradients are averaged over ranks once a step, in the last micro-batch's backward
            last = micro == ACCUM - 1
            with contextlib.nullcontext() if last else no_gradient_sync(model):
                loss = lm_loss(model, batch(step, micro, vocab_size)[rows]) / ACCUM
                loss.backward()
            total += all_reduce_mean(loss.detach()).item()
        norm = clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((total, norm.item()))
    return out


# --- two processes on one machine ----------------------------------------------------------


def _train_worker(mode: str, out: Path) -> None:
    cfg = ParallelConfig(mode=mode, activation_checkpointing=mode == "fsdp", mixed_precision="fp32")
    model = parallelize(tiny_lm(), cfg, CPU)
    per_rank = ROWS // dist.get_world_size()
    history = train(model, slice(rank() * per_rank, (rank() + 1) * per_rank))
    weights = export_state_dict(model)
    if rank() == 0:
        torch.save({"history": history, "weights": weights}, out)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_like_one_with_the_same_global_batch(mode, tmp_path):
    if mode == "fsdp":
        pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            pytest.skip("torch.distributed.fsdp.fully_shard (FSDP2) is not in this torch")
    reference = tiny_lm()
    expected = train(reference, slice(None))
    run_ranks(_train_worker, mode, tmp_path / "result.pt")
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    got = result["history"]
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in expected], rel=1e-5)
    # the gradient norm is that of the whole gradient, so every step clipped by the same factor
    assert [n for _, n in got] == pytest.approx([n for _, n in expected], rel=1e-4)
    assert all(n > MAX_NORM for _, n in expected)
    plain = reference.state_dict()
    assert result["weights"].keys() == plain.keys()
    for key, value in plain.items():
        torch.testing.assert_close(result["weights"][key], value, rtol=1e-4, atol=1e-5)


# --- activation checkpointing ---------------------------------------------------------------


def _loss_and_grads(model: torch.nn.Module, loss: torch.Tensor) -> tuple[float, dict]:
    loss.backward()
    grads = {name: p.grad.clone() for name, p in unwrap(model).named_parameters()}
    return loss.item(), grads


def _assert_same(a: tuple[float, dict], b: tuple[float, dict]) -> None:
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    names = [n.replace("._checkpoint_wrapped_module", "") for n in b[1]]
    assert list(a[1]) == names
    for (name, ga), gb in zip(a[1].items(), b[1].values(), strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7, msg=name)


def test_activation_checkpointing_keeps_lm_loss_and_gradients():
    ids = batch(0, 0, tiny_lm().config.vocab_size)
    plain = tiny_lm()
    checkpointed = parallelize(tiny_lm(), ParallelConfig(activation_checkpointing=True), CPU)
    assert type(checkpointed.layers[0]).__name__ == "CheckpointWrapper"
    _assert_same(
        _loss_and_grads(plain, lm_loss(plain, ids)),
        _loss_and_grads(checkpointed, lm_loss(checkpointed, ids)),
    )


def test_activation_checkpointing_keeps_tokenizer_loss_and_gradients(
    make_small_tokenizer, make_video
):
    """The residual blocks keep streaming state in a cache; the recomputation must see it as
    the first pass did, including on a second chunk, where the cache holds earlier frames."""
    video = make_video(batch=1, frames=9, height=16, width=16)

    def loss_of(model) -> torch.Tensor:
        out = model(video)
        chunked = StreamCache()  # frame 0 + 4 frames, then 4 more, with gradients
        first = model.encoder(video[:, :, :5], chunked)
        chunked.first = False
        second = model.encoder(video[:, :, 5:], chunked)
        return (out.recon - video).abs().mean() + first.square().mean() + second.square().mean()

    plain = make_small_tokenizer().train()
    checkpointed = parallelize(
        make_small_tokenizer().train(), ParallelConfig(activation_checkpointing=True), CPU
    )
    _assert_same(
        _loss_and_grads(plain, loss_of(plain)), _loss_and_grads(checkpointed, loss_of(checkpointed))
    )


def test_discriminator_blocks_are_checkpointed_with_the_same_gradients():
    torch.manual_seed(0)
    config = DiscriminatorConfig(base_width=4, max_width=8, n_blocks=2)
    video = torch.randn(1, 3, 5, 16, 16)
    plain = Discriminator3D(config)
    checkpointed = Discriminator3D(config)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed = parallelize(checkpointed, ParallelConfig(activation_checkpointing=True), CPU)
    assert type(checkpointed.blocks[0]).__name__ == "CheckpointWrapper"
    _assert_same(
        _loss_and_grads(plain, plain(video).square().mean()),
        _loss_and_grads(checkpointed, checkpointed(video).square().mean()),
    )


# --- keys, wrappers, errors -----------------------------------------------------------------


def test_checkpointed_and_compiled_model_saves_under_the_plain_keys(monkeypatch):
    monkeypatch.setattr(parallel, "cpu_can_compile", lambda: True)
    plain = tiny_lm().state_dict()
    cfg = ParallelConfig(activation_checkpointing=True, compile=True)
    model = parallelize(tiny_lm(seed=1), cfg, CPU)  # compiled lazily: nothing runs here
    assert unwrap(model) is model
    assert model.layers[0]._compiled_call_impl is not None
    saved = unwrap(model).state_dict()
    assert saved.keys() == plain.keys()
    fresh = tiny_lm(seed=2)
    fresh.load_state_dict(saved)
    assert export_state_dict(model).keys() == plain.keys()


def test_clip_grad_norm_matches_torch_on_plain_gradients():
    a, b = tiny_lm(), tiny_lm()
    ids = batch(0, 0, a.config.vocab_size)
    lm_loss(a, ids).backward()
    lm_loss(b, ids).backward()
    ours = clip_grad_norm_(a.parameters(), 0.01)
    theirs = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.01)
    torch.testing.assert_close(ours, theirs)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_config_and_process_group_errors_name_the_fix():
    with pytest.raises(ValueError, match="mode must be one of"):
        ParallelConfig(mode="zero3")
    with pytest.raises(ValueError, match="mixed_precision"):
        ParallelConfig(mixed_precision="fp16")
    with pytest.raises(ValueError, match="cpu_mixed_precision must be one of"):
        ParallelConfig(cpu_mixed_precision="fp16")
    with pytest.raises(ValueError, match="torchrun"):
        parallelize(tiny_lm(), ParallelConfig(mode="ddp"), CPU)
    with pytest.raises(ValueError, match="VideoLM, VideoTokenizer and Discriminator3D"):
        parallelize(torch.nn.Linear(2, 2), ParallelConfig(), CPU)


def test_cpu_mixed_precision_computes_the_forward_in_bf16_with_fp32_gradients():
    """ "bf16" autocasts on the CPU, "fp32" does not, "auto" follows the CPU's instructions; the
    loss and gradients stay close to fp32's and the weights' gradients stay fp32."""
    ids = batch(0, 0, tiny_lm().config.vocab_size)
    logits_dtype, loss, grads = {}, {}, {}
    for setting in ("fp32", "bf16", "auto"):
        model = tiny_lm()
        with autocast(ParallelConfig(cpu_mixed_precision=setting), CPU):
            logits = model(ids)  # (B, L, V)
        logits_dtype[setting] = logits.dtype
        ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss[setting], grads[setting] = _loss_and_grads(model, ce)
    assert logits_dtype["fp32"] == torch.float32
    assert logits_dtype["bf16"] == torch.bfloat16
    assert logits_dtype["auto"] == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert loss["bf16"] == pytest.approx(loss["fp32"], rel=2e-2)
    for name, g32 in grads["fp32"].items():
        g16 = grads["bf16"][name]
        assert g16.dtype == torch.float32
        assert (g16 - g32).norm() <= 0.05 * g32.norm() + 1e-6, name


def test_compile_stays_eager_on_a_cpu_that_cannot_build_kernels(monkeypatch):
    monkeypatch.setattr(parallel, "cpu_can_compile", lambda: False)
    model = parallelize(tiny_lm(), ParallelConfig(compile=True), CPU)
    assert all(layer._compiled_call_impl is None for layer in model.layers)
    ids = batch(0, 0, model.config.vocab_size)
    assert torch.isfinite(lm_loss(model, ids))


def test_cpu_can_compile_says_no_and_why_without_a_cxx_compiler(tmp_path):
    """A fresh process with CXX pointing nowhere and an empty inductor cache (a cached kernel
    would need no compiler)."""
    code = (
        "import logging; logging.basicConfig();"
        "from loong.train.parallel import cpu_can_compile; print('answer', cpu_can_compile())"
    )
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-c++"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "answer False" in done.stdout
    assert "parallel.compile" in done.stderr and "trains eager" in done.stderr


@pytest.mark.slow
def test_compiled_checkpointed_blocks_keep_loss_and_gradients():
    """Inductor compiles each block on its first call: about half a minute on a CPU."""
    ids = batch(0, 0, tiny_lm().config.vocab_size)
    plain = tiny_lm()
    cfg = ParallelConfig(activation_checkpointing=True, compile=True)
    compiled = parallelize(tiny_lm(), cfg, CPU)
    _assert_same(
        _loss_and_grads(plain, lm_loss(plain, ids)),
        _loss_and_grads(compiled, lm_loss(compiled, ids)),
    )


@pytest.mark.skipif(not parallel.cpu_can_compile(), reason="inductor cannot build CPU kernels")
def test_a_block_compiles_whole_without_autograd():
    """Without autograd (an evaluation during training) a compiled block must stay one graph:
    a break there made a frame per block, and past eight blocks' worth of frames (the shapes
    preset's evaluations) inductor's recompile limit warned and gave up."""
    model = tiny_lm()
    cfg = model.config
    length = 8
    x = torch.randn(2, length, cfg.dim, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(length)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
    block = model.layers[0]
    with torch.no_grad():
        want = block(x, cos, sin, None, None, pos)
        got = torch.compile(block, fullgraph=True)(x, cos, sin, None, None, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
