"""Memory and FLOPs of one training step of the language model, before renting the GPUs.

An estimate from layer shapes, not a measurement: parameters, gradients, AdamW's moments and the
tensors autograd saves for backward. It ignores the CUDA context and NCCL buffers (~1 GiB),
allocator fragmentation and caching, temporary buffers inside and between kernels, and FSDP's
shard padding; the headroom is for them. The model is built on the meta device, so even the 7B
preset costs no memory. Setup assumed: bf16 autocast, AdamW, one micro-batch a step
(gradient accumulation multiplies a step's tokens and FLOPs, not its memory), and

- ``ddp``: fp32 parameters under ``torch.autocast(bfloat16)`` as ``loong lm train`` runs,
  ``gradient_as_bucket_view=True`` (else DDP's buckets add 4 bytes a parameter); the residual
  stream stays fp32 (the embedding's output is), and autocast keeps a bf16 copy of each Linear
  weight from its first use until its backward;
- ``fsdp``: FSDP2 ``fully_shard`` on each block and on the root (embedding, final norm, head),
  ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: fp32 master shards,
  bf16 gathered weights, a bf16 residual stream.

Axes as in :mod:`loong.lm.model`: L sequence, D width, N heads, M key/value heads, E head width,
F SwiGLU width, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from loong.lm.model import VideoLM, VideoLMConfig
from loong.lm.presets import lm_preset

GIB = 2**30
BF16, FP32 = 2, 4
PARALLEL = ("ddp", "fsdp")


@dataclass(kw_only=True)
class MemoryPlan:
    """Per-GPU memory (GiB) and per-step FLOPs of one training step; see :func:`plan_memory`."""

    parallel: str
    gpus: int
    seq_len: int
    micro_batch: int
    gpu_mem_gib: float
    headroom: float
    params_total: int
    """Every parameter, both embedding matrices included."""
    params_non_embedding: int
    """Blocks and final norm: neither the input embedding nor the output head (Kaplan's N)."""
    master_weights_gib: float
    """fp32 parameters: replicated (ddp) or a 1/gpus shard (fsdp)."""
    compute_weights_gib: float
    """bf16 copies: autocast's of every Linear weight (ddp); gathered root + 2 blocks (fsdp)."""
    grads_gib: float
    """fp32 gradients, replicated or sharded like the master weights."""
    unsharded_grads_gib: float
    """fsdp: bf16 gradients and their fp32 reduce-scatter input for the root and one block."""
    optimizer_gib: float
    """AdamW's two fp32 moments, replicated or sharded."""
    activations_gib: float
    activations_checkpointed_gib: float
    total_gib: float
    total_checkpointed_gib: float
    budget_gib: float
    """gpu_mem_gib less the headroom share, the most a plan may use."""
    fits: bool
    fits_checkpointed: bool
    tokens_per_step: int
    flops_per_sequence: int
    flops_per_step: int
    recompute_flops_per_step: int
    """Extra FLOPs with per-block checkpointing: the blocks' forward, once more."""


def block_activation_bytes(config: VideoLMConfig, residual_bytes: int) -> int:
    """Bytes per token that one block saves for backward, with the residual stream in
    ``residual_bytes`` (4 under ddp, 2 under fsdp); Linear outputs are bf16 under autocast.

    - each RMSNorm: its input as fp32 (4D), the normalised tensor before the gain (r·D) and
      the fp32 reciprocal RMS (4);
    - the inputs of the linears in bf16: one shared copy before q/k/v and one before w1/w3 when
      the stream is bf16; one cast per linear (3 + 2 copies) when it is fp32;
    - SDPA (flash, no L×L scores): rotated q and k and v, 2·(N + 2M)·E; its output, also wo's
      input, 2·N·E; the fp32 log-sum-exp, 4·N;
    - SwiGLU: w1's output, its silu, w3's output and their product (w2's input), 4 × 2F.
    """
    d, e, f = config.dim, config.head_dim, config.hidden_dim
    n, m = config.n_heads, config.kv_heads
    norms = 2 * ((FP32 + residual_bytes) * d + FP32)
    linear_inputs = (2 if residual_bytes == BF16 else 5) * BF16 * d
    attention = BF16 * (n + 2 * m) * e + BF16 * n * e + FP32 * n
    swiglu = 4 * BF16 * f
    return norms + linear_inputs + attention + swiglu


def head_activation_bytes(config: VideoLMConfig, residual_bytes: int) -> int:
    """Bytes per token outside the blocks, saved for backward or held by the loss: the int64
    token ids and targets (16), the final norm ((4 + r)·D + 4), the head's bf16 input (2D),
    and the logits (10·V: bf16 from the head, the fp32 copy ``cross_entropy`` gets, and its
    fp32 log-probabilities; the first two are not saved but alive while the loss runs)."""
    d, v = config.dim, config.vocab_size
    norm = (FP32 + residual_bytes) * d + FP32
    return 2 * 8 + norm + BF16 * d + (BF16 + FP32 + FP32) * v


def training_flops(config: VideoLMConfig, seq_len: int) -> tuple[int, int]:
    """FLOPs of one training step on one sequence, and of the blocks' forward alone.

    Convention: a multiply-add is 2 FLOPs; backward costs twice the forward (gradients of inputs
    and of weights), so a step is 3 × forward; only matmuls count (no norms, softmax, RoPE).

    - Linears: 2 × (weights) a token; the blocks hold n_layers·(D·(N + 2M)·E + N·E·D + 3·D·F)
      (= N_non_embedding less the RMSNorm gains), the head D·V.
    - Causal attention: query i meets keys 0..i, so L(L+1)/2 pairs a head; QKᵀ and AV cost 2E
      each a pair: 2·n_layers·N·E·L(L+1) forward, i.e. 6·n_layers·D·L(L+1) a step, half of
      the non-causal 12·n_layers·D·L² (FlashAttention skips the masked blocks). Flash
      backward's recomputation of the scores is not counted.
    """
    d, e, f, v = config.dim, config.head_dim, config.hidden_dim, config.vocab_size
    n, m = config.n_heads, config.kv_heads
    block_weights = config.n_layers * (d * (n + 2 * m) * e + n * e * d + 3 * d * f)
    attention = 2 * config.n_layers * n * e * seq_len * (seq_len + 1)
    blocks_forward = 2 * block_weights * seq_len + attention
    forward = blocks_forward + 2 * d * v * seq_len
    return 3 * forward, blocks_forward


def plan_memory(
    config: VideoLMConfig,
    *,
    gpus: int = 8,
    seq_len: int = 4352,
    micro_batch: int = 1,
    parallel: str = "fsdp",
    gpu_mem_gib: float = 80.0,
    headroom: float = 0.1,
) -> MemoryPlan:
    """Per-GPU memory and per-step FLOPs of training ``config`` on ``micro_batch`` sequences of
    ``seq_len`` tokens on each of ``gpus`` GPUs; fits means a total within (1 − headroom)·gpu_mem.

    - States, bytes a parameter: 4 master + 4 gradient + 8 AdamW, divided by ``gpus`` under
      fsdp; plus bf16 copies: 2 a Linear weight (ddp), or 2 a gathered parameter of the root
      (gathered from forward to backward, FSDP2 does not reshard the root) and of two blocks (in
      use, prefetched) and 2 + 4 an unsharded gradient of the root and one block (fsdp).
    - Activations, tokens = micro_batch·seq_len, r the residual bytes (4 ddp, 2 fsdp):
      tokens·(n_layers·block + head) without checkpointing; tokens·(n_layers·r·D + block +
      head) with per-block checkpointing (each block keeps its input; one is recomputed at a
      time in backward). The ddp autocast copies count in both totals, an upper estimate with
      checkpointing, which drops them before the loss.
    """
    counts = (
        ("gpus", "gpus", gpus),
        ("seq_len", "seq", seq_len),
        ("micro_batch", "micro-batch", micro_batch),
    )
    for name, flag, value in counts:
        if value < 1:
            raise ValueError(f"{name} (--{flag}) must be 1 or more, got {value}")
    if gpu_mem_gib <= 0:
        raise ValueError(f"gpu_mem_gib (--gpu-mem) must be positive, got {gpu_mem_gib}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}: pass e.g. 0.1")
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if seq_len > config.max_seq_len:
        raise ValueError(
            f"seq_len {seq_len} exceeds the model's max_seq_len {config.max_seq_len}: "
            f"pass --seq {config.max_seq_len} or less"
        )

    # 1. parameters, counted on the meta device
    with torch.device("meta"):
        model = VideoLM(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.tok_embeddings.weight.numel()
    head = 0 if model.output is None else model.output.weight.numel()
    non_embedding = total - embedding - head
    block = sum(p.numel() for p in model.layers[0].parameters())
    root = total - config.n_layers * block
    linear = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear))
    linear += embedding if model.output is None else 0  # a tied head's matmul casts the table

    # 2. states: replicated (ddp) or sharded (fsdp)
    shards, residual = (gpus, BF16) if parallel == "fsdp" else (1, FP32)
    if parallel == "fsdp":
        compute, unsharded = BF16 * (root + 2 * block), (BF16 + FP32) * (root + block)
    else:
        compute, unsharded = BF16 * linear, 0
    states = (FP32 + FP32 + 2 * FP32) * total / shards + compute + unsharded

    # 3. activations
    tokens = micro_batch * seq_len
    per_block = block_activation_bytes(config, residual)
    per_head = head_activation_bytes(config, residual)
    activations = tokens * (config.n_layers * per_block + per_head)
    checkpointed = tokens * (config.n_layers * residual * config.dim + per_block + per_head)

    # 4. FLOPs
    per_sequence, blocks_forward = training_flops(config, seq_len)
    sequences = gpus * micro_batch
    budget = (1 - headroom) * gpu_mem_gib
    return MemoryPlan(
        parallel=parallel,
        gpus=gpus,
        seq_len=seq_len,
        micro_batch=micro_batch,
        gpu_mem_gib=gpu_mem_gib,
        headroom=headroom,
        params_total=total,
        params_non_embedding=non_embedding,
        master_weights_gib=FP32 * total / shards / GIB,
        compute_weights_gib=compute / GIB,
        grads_gib=FP32 * total / shards / GIB,
        unsharded_grads_gib=unsharded / GIB,
        optimizer_gib=2 * FP32 * total / shards / GIB,
        activations_gib=activations / GIB,
        activations_checkpointed_gib=checkpointed / GIB,
        total_gib=(states + activations) / GIB,
        total_checkpointed_gib=(states + checkpointed) / GIB,
        budget_gib=budget,
        fits=(states + activations) / GIB <= budget,
        fits_checkpointed=(states + checkpointed) / GIB <= budget,
        tokens_per_step=sequences * seq_len,
        flops_per_sequence=per_sequence,
        flops_per_step=sequences * per_sequence,
        recompute_flops_per_step=sequences * blocks_forward,
    )


def format_plan(plan: MemoryPlan, preset: str) -> str:
    """A fixed-width table of ``plan`` for the terminal."""
    fsdp = plan.parallel == "fsdp"
    split = f"sharded ÷{plan.gpus}" if fsdp else "replicated"
    bf16 = "bf16 gathered (root + 2 blocks)" if fsdp else "bf16 autocast copy"
    yes = {True: "yes", False: "NO"}

    def row(label: str, a: object, b: object = "") -> str:
        a, b = (f"{x:.2f}" if isinstance(x, float) else str(x) for x in (a, b))
        return f"  {label:<46}{a:>10}{b:>12}".rstrip()

    states = [
        (f"weights, fp32 master ({split})", plan.master_weights_gib),
        (f"weights, {bf16}", plan.compute_weights_gib),
        (f"gradients, fp32 ({split})", plan.grads_gib),
        ("gradients, unsharded (root + 1 block)", plan.unsharded_grads_gib),
        (f"AdamW moments, 2 × fp32 ({split})", plan.optimizer_gib),
    ]
    lines = [
        f"loong plan: {preset}, {plan.parallel} on {plan.gpus} GPUs × {plan.gpu_mem_gib:g} GiB, "
        f"seq {plan.seq_len} × micro-batch {plan.micro_batch}, bf16 autocast, AdamW",
        f"  parameters: {plan.params_total:,} total, "
        f"{plan.params_non_embedding:,} non-embedding (no embedding, no head)",
        "",
        row("memory per GPU, GiB (an estimate)", "no ckpt", "block ckpt"),
        *(row(label, gib, gib) for label, gib in states if fsdp or gib),
        row("activations", plan.activations_gib, plan.activations_checkpointed_gib),
        row("total", plan.total_gib, plan.total_checkpointed_gib),
        row(
            f"fits in {plan.budget_gib:.1f} GiB ({plan.headroom:.0%} kept as headroom)",
            yes[plan.fits],
            yes[plan.fits_checkpointed],
        ),
        "",
        "  FLOPs (matmuls, causal attention; backward = 2 × forward)",
        row("tokens per step", f"{plan.tokens_per_step:,}"),
        row("per sequence", f"{plan.flops_per_sequence:.3e}"),
        row(f"per step ({plan.gpus * plan.micro_batch} sequences)", f"{plan.flops_per_step:.3e}"),
        row("block ckpt recompute per step", f"+{plan.recompute_flops_per_step:.3e}"),
        "  not counted: CUDA context, NCCL and temporary buffers, allocator fragmentation",
    ]
    return "\n".join(lines)


def add_plan_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``loong plan`` to the ``loong`` subcommands; returns its parser."""
    p = commands.add_parser("plan", help="per-GPU memory and FLOPs of a training step")
    p.add_argument("--preset", default="loong-700m", help="LM preset (default: loong-700m)")
    p.add_argument("--gpus", type=int, default=8, help="number of GPUs (default: 8)")
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default: 80)")
    p.add_argument("--seq", type=int, default=4352, help="tokens a sequence (default: 4352)")
    p.add_argument(
        "--micro-batch", type=int, default=1, help="sequences per GPU a micro-batch (default: 1)"
    )
    p.add_argument("--parallel", choices=PARALLEL, default="fsdp", help="default: fsdp")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan of ``args`` (from :func:`add_plan_parser`) as a table or JSON."""
    plan = plan_memory(
        lm_preset(args.preset),
        gpus=args.gpus,
        seq_len=args.seq,
        micro_batch=args.micro_batch,
        parallel=args.parallel,
        gpu_mem_gib=args.gpu_mem,
    )
    if args.json:
        print(json.dumps({"preset": args.preset, **asdict(plan)}, indent=2))
    else:
        print(format_plan(plan, args.preset))
    return 0
