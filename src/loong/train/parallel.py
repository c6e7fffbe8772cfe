"""Data parallelism (DDP or FSDP2), activation checkpointing and compilation, applied from outside.

The models stay pure ``nn.Module`` files; a training loop builds one, then calls
:func:`parallelize`, which changes it in place block by block and wraps it at the root for DDP:

1. activation checkpointing: each block is wrapped so that its activations are recomputed in the
   backward pass instead of stored (the wrapper keeps state-dict keys unchanged);
2. compilation: ``block.compile()``, in place, so no ``_orig_mod.`` appears in any key; on a
   CPU only where inductor can build its C++ kernels (:func:`cpu_can_compile`), else eager with
   a warning, so that a run asked to compile never fails on a machine without a compiler;
3. FSDP2: ``fully_shard`` on each block, then on the root, with bf16 parameters and fp32 gradient
   reduction when asked for on a GPU; or DDP around the whole model.

The blocks are the transformer blocks of :class:`VideoLM` (``model.layers``) and the residual
blocks of :class:`VideoTokenizer` and :class:`Discriminator3D`. Save :func:`unwrap` ``(model)``
(or, under FSDP, :func:`export_state_dict`), clip with :func:`clip_grad_norm_`, which is correct for
FSDP2's sharded gradients, and accumulate micro-batches inside :func:`no_gradient_sync`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from loong.lm.model import VideoLM
from loong.train.dist import is_distributed, world_size
from loong.video_tokenizer.causal_conv import CausalConv3d, StreamCache
from loong.video_tokenizer.discriminator import Discriminator3D
from loong.video_tokenizer.model import VideoTokenizer

log = logging.getLogger("loong")

MODES = ("none", "ddp", "fsdp")
PRECISIONS = ("bf16", "fp32")
CPU_PRECISIONS = ("fp32", "bf16", "auto")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX tiles).

    Without those instructions oneDNN emulates bf16 matmuls and they run slower than fp32."""
    check = [
        getattr(torch.cpu, name, None)
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return any(f is not None and f() for f in check)


@functools.cache
def cpu_can_compile() -> bool:
    """Whether inductor builds and runs a CPU kernel here (it needs a C++ compiler); tried once,
    on a two-element tensor, a few seconds the first time (then inductor's cache answers)."""
    try:
        out = torch.compile(lambda x: torch.relu(x) * 2 + 1, fullgraph=True)(torch.ones(2))
        works = bool(torch.equal(out, torch.full((2,), 3.0)))
        reason = "" if works else "a compiled test kernel gave a wrong result"
    except Exception as error:  # any failure of the toolchain means: run eager
        works = False
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not works:
        log.warning(
            "parallel.compile: torch.compile cannot build CPU kernels here (%s); the model "
            "trains eager. Install a C++ compiler (or set CXX) to compile it.",
            reason,
        )
    return works


@dataclass(kw_only=True)
class ParallelConfig:
    mode: str = "none"
    """"none" (one process, or ranks that never sync), "ddp" (replicated weights) or "fsdp"
    (FSDP2: weights, gradients and optimizer state sharded over ranks)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them."""
    compile: bool = False
    """torch.compile each block (in place; state-dict keys do not change). On a CPU without a
    working C++ toolchain (:func:`cpu_can_compile`) the blocks stay eager, with a warning."""
    mixed_precision: str = "bf16"
    """"bf16": bf16 compute with fp32 weights and gradient reduction, on CUDA only (FSDP2's
    parameter casts under "fsdp", :func:`autocast` otherwise); "fp32": none. CPU runs follow
    ``cpu_mixed_precision``."""
    cpu_mixed_precision: str = "fp32"
    """On CPU: "bf16" autocasts the forward pass to bf16 (weights, gradients and optimizer state
    stay fp32); "auto" does so only on a CPU with native bf16 instructions (:func:`cpu_has_bf16`),
    where the ``shapes`` LM trains about 1.3× faster and the ``shapes`` tokenizer 1.2–1.4× (its
    quantizer stays fp32; BENCHMARKS.md); "fp32": never."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"parallel.mode must be one of {MODES}, got {self.mode!r}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(
                f"parallel.mixed_precision must be one of {PRECISIONS}, got "
                f"{self.mixed_precision!r}"
            )
        if self.cpu_mixed_precision not in CPU_PRECISIONS:
            raise ValueError(
                f"parallel.cpu_mixed_precision must be one of {CPU_PRECISIONS}, got "
                f"{self.cpu_mixed_precision!r}"
            )


def compiles(cfg: ParallelConfig, device: torch.device) -> bool:
    """Whether ``cfg`` compiles on ``device``: asked to, and on a CPU able to build kernels."""
    return cfg.compile and (device.type != "cpu" or cpu_can_compile())


def parallelize(model: nn.Module, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """Apply ``cfg`` to ``model`` (a VideoLM, VideoTokenizer or Discriminator3D); return the
    module to train: ``model`` itself, changed in place, or a DDP wrapper around it.

    Parameters are moved to ``device`` unless they are on the meta device: then, after this call,
    ``model.to_empty(device=device)`` and ``model.init_weights()`` materialise the (sharded)
    weights. "ddp" and "fsdp" need a running process group (see ``init_distributed``).
    """
    if cfg.mode != "none" and not is_distributed():
        raise ValueError(
            f'parallel.mode="{cfg.mode}" needs a process group: launch with torchrun and call '
            'loong.train.dist.init_distributed() first, or set parallel.mode="none"'
        )
    on_meta = any(p.is_meta for p in model.parameters())
    if not on_meta:
        model.to(device)
    blocks = _blocks(model)

    # 1. activation checkpointing, block by block
    if cfg.activation_checkpointing:
        for parent, i in blocks:
            parent[i] = _checkpointed(parent[i])

    # 2. compilation, block by block and in place
    if compiles(cfg, device):
        for parent, i in blocks:
            parent[i].compile()

    # 3. data parallelism
    if cfg.mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world_size(),))
        bf16 = cfg.mixed_precision == "bf16" and device.type == "cuda"
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        for n, (parent, i) in enumerate(blocks):
            # The last block's weights are needed again at once by the backward pass: keep them.
            last = n == len(blocks) - 1
            fully_shard(parent[i], mesh=mesh, mp_policy=policy, reshard_after_forward=not last)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model
    if cfg.mode == "ddp":
        return DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself, without a DDP or ``torch.compile`` wrapper: its ``state_dict`` has the
    plain model's keys (checkpointed and compiled blocks keep theirs). Under FSDP its tensors are
    shards; :func:`export_state_dict` gathers them."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return getattr(model, "_orig_mod", model)


def export_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights on the CPU, under the plain model's keys, for an export.

    Call it on every rank: under FSDP it gathers the shards, and rank 0 receives the tensors
    (other ranks an empty dict); otherwise every rank gets a CPU copy of its weights.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(unwrap(model), options=options)


def autocast(cfg: ParallelConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass when ``cfg`` asks for bf16 on CUDA without FSDP (whose
    parameter casts already give bf16 compute), or for bf16 on the CPU
    (``cpu_mixed_precision``); a no-op context otherwise."""
    if cfg.mixed_precision == "bf16" and device.type == "cuda" and cfg.mode != "fsdp":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if device.type == "cpu" and (
        cfg.cpu_mixed_precision == "bf16" or (cfg.cpu_mixed_precision == "auto" and cpu_has_bf16())
    ):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate gradients locally inside the block (the micro-batches before the last one of a
    step): DDP's ``no_sync``, FSDP2's ``set_requires_gradient_sync(False)``; no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients so that their global L2 norm is at most ``max_norm``; return the norm
    before clipping (a scalar tensor, the same on every rank). ``math.inf`` only measures.

    Under FSDP2 each gradient is a DTensor holding this rank's shard: the squared norms of the
    shards are summed over ranks (``full_tensor``), so the norm is that of the whole gradient and
    every rank scales its shard by the same factor. Plain (replicated) gradients add their norm
    once, as they are the same on every rank.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0)
    sharded = [p.grad for p in params if isinstance(p.grad, DTensor)]
    plain = [p.grad for p in params if not isinstance(p.grad, DTensor)]
    squares = []
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded, norm_type=2.0)
        squares.append(norm.full_tensor().float() ** 2)  # DTensor: reduced over the shards
    if plain:
        squares.append(torch.nn.utils.get_total_norm(plain, norm_type=2.0).float() ** 2)
    device = squares[0].device
    total = torch.stack([s.to(device) for s in squares]).sum().sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# --- blocks and their checkpoint wrappers ----------------------------------------------------


def _blocks(model: nn.Module) -> list[tuple[nn.ModuleList, int]]:
    """(container, index) of every block to checkpoint, compile and shard, in forward order."""
    if isinstance(model, VideoLM):
        return [(model.layers, i) for i in range(len(model.layers))]
    if isinstance(model, VideoTokenizer):
        stages = [*model.encoder.stages, *model.decoder.stages]
        return [(blocks, i) for blocks in stages for i in range(len(blocks))]
    if isinstance(model, Discriminator3D):
        return [(model.blocks, i) for i in range(len(model.blocks))]
    raise ValueError(
        "parallelize knows VideoLM, VideoTokenizer and Discriminator3D, got "
        f"{type(model).__name__}: pass one of them (not a DDP-wrapped or compiled copy)"
    )


def _checkpointed(block: nn.Module) -> nn.Module:
    """``block`` wrapped for non-reentrant activation checkpointing (keys stay the same)."""
    if any(isinstance(m, CausalConv3d) for m in block.modules()):
        return checkpoint_wrapper(block, checkpoint_fn=_checkpoint_causal_block)
    return checkpoint_wrapper(block)


def _checkpoint_causal_block(block: nn.Module, x: torch.Tensor, cache: StreamCache, *args: Any):
    """Checkpoint a residual block of causal convolutions (``block(x, cache, *args)``).

    Each causal convolution pops its leftover frames from the ``StreamCache`` and stores new ones,
    so the recomputation in the backward pass would find the cache as the first pass left it. It
    is given back the entries the first pass started from: the same inputs, the same result.
    """
    if not torch.is_grad_enabled():
        return block(x, cache, *args)
    keys = [id(m) for m in block.modules() if isinstance(m, CausalConv3d)]
    before = {key: cache.pop(key) for key in keys}  # the leftover frames of an earlier chunk

    def run(x: torch.Tensor, *args: Any) -> torch.Tensor:
        for key, frames in before.items():
            cache.pop(key)
            if frames is not None:
                cache.put(key, frames)
        return block(x, cache, *args)

    return checkpoint(run, x, *args, use_reentrant=False)
