"""CPU training speed in fp32 against bf16 autocast (``parallel.cpu_mixed_precision``).

One process, the same threads, weights and inputs. For each model a step is forward + backward
+ AdamW, timed under fp32 and under bf16 autocast (``loong.train.parallel.autocast`` with
``cpu_mixed_precision`` "fp32" and "bf16", the training loops' own context), the two
interleaved round by round with the order flipped every round, so that both share the
machine's noise; medians and the ratio fp32/bf16
(> 1: bf16 is faster) are reported.

- lm: the ``shapes`` LM preset on a batch ``(B, L)`` of random ids, next-token cross-entropy on
  the logits in fp32 (as ``weighted_loss`` computes it).
- tokenizer: the ``shapes`` video tokenizer preset on ``(B, 3, T, 64, 64)`` random clips, L2
  reconstruction plus the quantizer's loss (no discriminator, no perceptual loss).

Whether the CPU has native bf16 instructions (AVX-512 BF16 or AMX) is printed: without them
oneDNN emulates bf16 and it is slower than fp32, which is why ``cpu_mixed_precision="auto"``
turns it on only where they exist. The first step's losses of both precisions, from the same
weights, are printed too.

    .venv/bin/python benchmarks/cpu_precision.py --json runs/cpu_precision.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from common import block_network, machine, write_json
from loong.lm.model import VideoLM
from loong.train.parallel import ParallelConfig, autocast, cpu_has_bf16
from loong.video_tokenizer.model import VideoTokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each precision")
    parser.add_argument("--lm-batch", type=int, default=8)
    parser.add_argument("--lm-len", type=int, default=600, help="9 latent frames + caption")
    parser.add_argument("--tok-batch", type=int, default=4)
    parser.add_argument("--tok-frames", type=int, default=9)
    parser.add_argument("--skip", choices=("lm", "tokenizer"), action="append", default=[])
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


CPU = torch.device("cpu")


def precision(bf16: bool) -> ParallelConfig:
    return ParallelConfig(cpu_mixed_precision="bf16" if bf16 else "fp32")


def lm_train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: ParallelConfig, ids: torch.Tensor
) -> float:
    """Forward under ``cfg``'s autocast, next-token cross-entropy on the logits in fp32, backward,
    AdamW; returns the loss. ``ids``: ``(B, L)``."""
    with autocast(cfg, CPU):
        logits = model(ids)  # (B, L, V)
    loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def lm_step(batch: int, length: int) -> Callable[[bool], float]:
    """A training step of the ``shapes`` LM; returns the loss."""
    torch.manual_seed(0)
    model = VideoLM.from_preset("shapes")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(model.config.vocab_size, (batch, length))
    return lambda bf16: lm_train_step(model, opt, precision(bf16), ids)


def tokenizer_step(batch: int, frames: int) -> Callable[[bool], float]:
    """A training step of the ``shapes`` video tokenizer (reconstruction + quantizer loss)."""
    torch.manual_seed(0)
    model = VideoTokenizer.from_preset("shapes")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    clips = torch.rand(batch, 3, frames, 64, 64) * 2 - 1

    return lambda bf16: tokenizer_train_step(model, opt, precision(bf16), clips)


def tokenizer_train_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: ParallelConfig, clips: torch.Tensor
) -> float:
    """Forward under ``cfg``'s autocast, L2 reconstruction plus the quantizer's loss in fp32,
    backward, AdamW; returns the loss. ``clips``: ``(B, 3, T, H, W)`` in [−1, 1]."""
    with autocast(cfg, CPU):
        out = model(clips)
    loss = F.mse_loss(out.recon.float(), clips) + out.quantizer_loss.float()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def first_losses(make: Callable[[], Callable[[bool], float]]) -> dict[str, float]:
    """The first step's loss in each precision, each from a fresh copy of the same weights."""
    return {name: make()(bf16) for name, bf16 in (("fp32", False), ("bf16", True))}


def time_pair(step: Callable[[bool], float], repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        step(False)
        step(True)
    times: dict[bool, list[float]] = {False: [], True: []}
    for r in range(repeats):
        for bf16 in (False, True) if r % 2 == 0 else (True, False):
            start = time.perf_counter()
            step(bf16)
            times[bf16].append(time.perf_counter() - start)
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    return {"fp32_s": fp32, "bf16_s": bf16, "ratio": fp32 / bf16}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    block_network("cpu_precision")
    result: dict[str, object] = {
        **machine(),
        "native_bf16": cpu_has_bf16(),
    }
    print(f"{result['cpu']}, {result['threads']} threads, native bf16: {result['native_bf16']}")
    runs = {
        "lm": (lambda: lm_step(args.lm_batch, args.lm_len), f"B={args.lm_batch} L={args.lm_len}"),
        "tokenizer": (
            lambda: tokenizer_step(args.tok_batch, args.tok_frames),
            f"B={args.tok_batch} T={args.tok_frames} 64x64",
        ),
    }
    for name, (make, shape) in runs.items():
        if name in args.skip:
            continue
        losses = first_losses(make)
        timing = time_pair(make(), args.repeats, args.warmup)
        result[name] = {"shape": shape, "first_loss": losses, **timing}
        print(
            f"{name:9} {shape:22} fp32 {timing['fp32_s']:.3f} s  bf16 {timing['bf16_s']:.3f} s  "
            f"fp32/bf16 {timing['ratio']:.2f}x  first loss {losses['fp32']:.4f} / "
            f"{losses['bf16']:.4f}"
        )
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
