"""How fast can the ``shapes`` tokenizer learn the objects of four fixed clips? A diagnostic.

    python benchmarks/tokenizer_overfit.py --loss l1 --steps 150            # as trained
    python benchmarks/tokenizer_overfit.py --loss l2 --steps 150
    python benchmarks/tokenizer_overfit.py --loss l1 --no-quantizer --frames 1 --steps 750
    python benchmarks/tokenizer_overfit.py --loss l2 --no-quantizer --frames 1 --groups 8

Trains a fresh ``shapes``-preset tokenizer (Adam, no EMA, no GAN) on the same four rendered
shapes-world clips again and again, and prints, every ``--every`` steps, the mean L1 error and
what the fidelity scorer sees in the middle reconstructed frame of each clip: the blob's nearest
palette colour, its area in pixels and its fill ratio (None: no object found). The clips are a
red circle, a large blue square, a yellow triangle on gray and a green square, whose true areas
are 112, 400, 72 and 144 pixels and fill ratios 0.78, 1.0, 0.55 and 1.0 (the scorer reads > 0.9
as a square, < 0.65 as a triangle). ``--no-quantizer`` passes the encoder's continuous latent
straight to the decoder, which separates the quantizer's share of the difficulty from the
autoencoder's.

With ``--fresh B`` it learns the world instead of memorising: every step is a new batch of B
shapes-world clips (the training pipeline's), and it prints, besides the four clips above (now
unseen), the median fill ratio of a still small red square, circle and triangle at 12 places
(scenes as in ``tokenizer_ceiling.py``'s ``shape_codes``), after the round trip:

    python benchmarks/tokenizer_overfit.py --loss l2 --frames 1 --fresh 16 --steps 1500 --every 250
    # and the same with --no-quantizer, or with --quantize-from 500 (continuous first)

Each evaluation also prints the size of the encoder's latent on the stills (median and 99th
percentile of |z|, before any quantizer). ``--no-rounding`` (FSQ only) passes FSQ's tanh-bounded
latent to the decoder without rounding it, which separates the bound's share from the rounding's.
"""

from __future__ import annotations

import argparse
import json
import types

import numpy as np
import torch

from loong.data.shapes import parse_caption, render
from loong.evaluate.fidelity import measure_frame
from loong.train.tokenizer_config import TokenizerDataConfig
from loong.train.tokenizer_data import training_batches
from loong.video_tokenizer.model import VideoTokenizer
from loong.video_tokenizer.presets import tokenizer_preset
from loong.video_tokenizer.quantize import FiniteScalarQuantizer, QuantizerOutput

SHAPES = ("square", "circle", "triangle")


def _clips(captions: list[str], frames: int, seeds: list[int]) -> torch.Tensor:
    """Rendered clips (N, C, T, H, W) in [-1, 1], one a (caption, seed)."""
    clips = [
        render(parse_caption(c), seed=s, height=64, width=64, n_frames=frames)
        for c, s in zip(captions, seeds, strict=True)
    ]
    video = torch.stack([torch.from_numpy(c).permute(3, 0, 1, 2) for c in clips])
    return video.float() / 127.5 - 1


def _blobs(recon: torch.Tensor) -> list:
    """What the scorer sees in the middle frame of each reconstruction (N, C, T, H, W)."""
    middle = recon[:, :, recon.shape[2] // 2].detach().clamp(-1, 1)  # (N, C, H, W)
    frames = ((middle + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [measure_frame(f) for f in frames]


CAPTIONS = (
    "a red circle moves right",
    "a large blue square moves up-left quickly",
    "a yellow triangle moves down on a gray background",
    "a green square moves left",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=("l1", "l2"), default="l1")
    parser.add_argument("--no-quantizer", action="store_true")
    parser.add_argument("--frames", type=int, default=9, help="frames per clip, 1 + 4k")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=75)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="shapes", help="tokenizer preset (default: shapes)")
    parser.add_argument("--groups", type=int, default=None, help="GroupNorm groups (shapes: 32)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a model config field, e.g. decoder_blocks=2 or local_encoder=false (repeatable)",
    )
    parser.add_argument(
        "--fresh", type=int, default=0, metavar="B", help="learn the world, B fresh clips a step"
    )
    parser.add_argument(
        "--no-rounding",
        action="store_true",
        help="FSQ only: pass its tanh-bounded latent to the decoder without rounding it",
    )
    parser.add_argument(
        "--quantize-from",
        type=int,
        default=0,
        metavar="STEP",
        help="train through the continuous latent until STEP, then through the quantizer",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    overrides = {} if args.groups is None else {"num_groups": args.groups}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=JSON, e.g. decoder_blocks=2")
        overrides[key] = json.loads(value)
    model = VideoTokenizer(tokenizer_preset(args.preset, **overrides))
    if args.no_rounding:
        if not isinstance(model.quantizer, FiniteScalarQuantizer):
            parser.error("--no-rounding needs an FSQ model: --set 'quantizer.kind=\"fsq\"'")

        def bound_only(self: FiniteScalarQuantizer, z: torch.Tensor) -> QuantizerOutput:
            bounded = self.bound(z.float())  # (N, D)
            half_width = self.levels // 2
            codes = (bounded / half_width).to(z.dtype)  # (N, D) in [−1, 1], not on the levels
            level = bounded.round().clamp(-half_width, half_width - 1)
            indices = ((level.long() + half_width) * self.basis).sum(-1)  # (N,)
            return QuantizerOutput(codes, indices, z.new_zeros((), dtype=torch.float32), {})

        model.quantizer.forward = types.MethodType(bound_only, model.quantizer)
    opt = torch.optim.Adam(model.parameters(), args.lr)
    video = _clips(list(CAPTIONS), args.frames, [1] * len(CAPTIONS))  # (4, C, T, H, W)
    # still small red shapes, 12 places; a scene's seed fixes the place, whatever the shape
    stills = _clips(
        [f"a red {s}" for s in SHAPES for _ in range(12)], args.frames, list(range(12)) * 3
    )
    batches = None
    if args.fresh:
        data = TokenizerDataConfig(n_frames=args.frames, size=64, batch_size=args.fresh)
        batches = training_batches(data, {})

    for step in range(args.steps + 1):
        quantize = not args.no_quantizer and step >= args.quantize_from
        if args.quantize_from and step == args.quantize_from:
            print(f"step {step:4d}  the quantizer is on", flush=True)
        model.train()
        clips = video if batches is None else next(batches)
        out = model(clips, quantize=quantize)
        error = out.recon - clips
        rec = error.abs().mean() if args.loss == "l1" else error.pow(2).mean()
        opt.zero_grad()
        (rec + out.quantizer_loss).backward()
        opt.step()
        if step % args.every == 0:
            if batches is not None:
                model.eval()
                with torch.no_grad():
                    out = model(video, quantize=quantize)
                    seen = _blobs(model(stills, quantize=quantize).recon)
                    z = model.encode_latents(stills).abs().flatten()  # before any quantizer
                    scale = f"|z| median {z.median():.2f}, 99% {z.quantile(0.99):.2f}"
                fills = [m.fill_ratio if m else float("nan") for m in seen]
                median = {
                    shape: float(np.nanmedian(fills[12 * k : 12 * (k + 1)]))
                    for k, shape in enumerate(SHAPES)
                }
                print(
                    f"step {step:4d}  stills' median fill: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in median.items())
                    + f"; the latent's {scale}",
                    flush=True,
                )
            blobs = [
                (m.colour, m.area, round(m.fill_ratio, 2)) if m else None for m in _blobs(out.recon)
            ]
            error = (out.recon - video).abs().mean().item()
            print(f"step {step:4d}  L1 {error:.4f}  {blobs}", flush=True)


if __name__ == "__main__":
    main()
