"""CPU time of one video tokenizer training step, and of its norms' fast path against the reference.

A step is the training loop's model step, less the data, the discriminator, EMA and events:
forward under the loop's autocast (``parallel.cpu_mixed_precision`` of the preset, bf16 where
the CPU has native bf16), L2 reconstruction plus the quantizer's loss, backward, fused AdamW
(``cpu_precision.tokenizer_train_step``). The config is ``--preset``'s training config with
``--set`` overrides as ``loong tokenizer train`` takes them (default: the 30-minute command's
whole-frame CVQ tokenizer with one encoder and two decoder blocks a stage); the clips are
random. Median over ``--steps`` after
``--warmup``.

``--norms`` also times the step with the decoder's per-cell scale and shift on their reference
path (:func:`loong.video_tokenizer.norm.cell_affine_reference`) in the same process, the two
interleaved round by round with the order flipped every round, and prints the ratio. To
compare two versions of the code, run the script once from each (a ``git worktree`` of the
older commit on ``PYTHONPATH``), alternating.

    .venv/bin/python benchmarks/tokenizer_step.py --norms --json runs/tokenizer_step.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common import block_network, machine, write_json
from cpu_precision import tokenizer_train_step
from loong.config import apply_overrides, parse_set
from loong.train.optim import OptimConfig, adamw
from loong.train.parallel import autocast
from loong.train.tokenizer_config import tokenizer_train_preset
from loong.video_tokenizer.model import VideoTokenizer

THIRTY_MINUTE_MODEL = [
    'model.quantizer.kind="cvq"',
    "model.quantizer.codebook_size=4096",
    "model.local_encoder=false",
    "model.encoder_blocks=1",
    "model.decoder_blocks=2",
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="shapes")
    parser.add_argument(
        "--set", action="append", default=None, metavar="KEY=VALUE",
        help="train-config overrides (default: the 30-minute command's model)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, help="clips a step (default: the preset's)")
    parser.add_argument("--frames", type=int, help="frames a clip (default: the preset's)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--norms", action="store_true", help="also time the reference norms")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def make_step(args: argparse.Namespace) -> tuple[Callable[[], float], dict[str, object]]:
    """A training step of the configured tokenizer on fixed random clips; returns its loss."""
    overrides = THIRTY_MINUTE_MODEL if args.set is None else args.set
    cfg = apply_overrides(tokenizer_train_preset(args.preset), parse_set(overrides))
    batch = args.batch or cfg.data.batch_size
    frames = args.frames or cfg.data.n_frames
    torch.manual_seed(0)
    model = VideoTokenizer(cfg.model)
    opt = adamw(model.parameters(), OptimConfig(lr=1e-4))
    clips = torch.rand(batch, 3, frames, cfg.data.size, cfg.data.size) * 2 - 1
    step = functools.partial(tokenizer_train_step, model, opt, cfg.parallel, clips)
    setup = {
        "preset": args.preset,
        "overrides": overrides,
        "parameters": sum(p.numel() for p in model.parameters()),
        "clips": [batch, 3, frames, cfg.data.size, cfg.data.size],
        # what the loop's own autocast does here with the preset's cpu_mixed_precision
        "bf16_autocast": isinstance(autocast(cfg.parallel, torch.device("cpu")), torch.autocast),
    }
    return step, setup


def norm_paths(both: bool) -> dict[str, Callable[[], None]]:
    """Switches to each path of the decoder's per-cell scale and shift. Without ``both`` only
    the code's own path, so that the script also times commits from before the fast path."""
    if not both:
        return {"fast": lambda: None}
    import loong.video_tokenizer.model as tokenizer_model
    from loong.video_tokenizer.norm import cell_affine, cell_affine_reference

    def switch(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        return lambda: setattr(tokenizer_model, "cell_affine", fn)

    return {"fast": switch(cell_affine), "reference": switch(cell_affine_reference)}


def timed(step: Callable[[], float]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    block_network("tokenizer_step")
    step, setup = make_step(args)
    result: dict[str, object] = {**machine(), **setup}
    print(f"{result['cpu']}, {result['threads']} threads")
    print(f"{setup['parameters']:,} parameters; clips {setup['clips']}; ", end="")
    print(f"bf16 autocast: {setup['bf16_autocast']}")
    use = norm_paths(args.norms)
    names = list(use)
    times: dict[str, list[float]] = {name: [] for name in names}
    try:
        for name in names:
            use[name]()
            for _ in range(args.warmup):
                step()
        for r in range(args.steps):
            for name in names if r % 2 == 0 else names[::-1]:
                use[name]()
                times[name].append(timed(step))
    finally:
        use["fast"]()
    for name in names:
        median = statistics.median(times[name])
        result[f"{name}_step_s"] = median
        label = f"step, norms {name}" if args.norms else "step"
        print(f"{label}: {median:.4f} s (median of {args.steps})")
    if args.norms:
        result["reference_over_fast"] = result["reference_step_s"] / result["fast_step_s"]
        print(f"reference / fast: {result['reference_over_fast']:.3f}x")
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
