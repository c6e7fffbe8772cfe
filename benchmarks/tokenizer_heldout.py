"""Held-out PSNR and SSIM of video tokenizers on many clips, and paired differences between them.

    python benchmarks/tokenizer_heldout.py runs/a/export runs/b/export --labels a b
    python benchmarks/tokenizer_heldout.py runs/a/export --clips 64 --sets 0 1 2

A training run evaluates 16 held-out clips of the shapes world, drawn from its own data seed
(``data.seed`` + an offset), so two runs with different data seeds are scored on different
clips, and 16 clips move the mean by more than the differences between the settings compared:
one tokenizer scored 31.43 dB on the 16 clips of seed 0 and 29.82 dB on those of seed 1. This
scores every export on the same clips: ``--clips`` of each of the ``--sets`` (data seeds), in
fp32 as the training loop's evaluation is (bf16 autocast costs these tokenizers PSNR and SSIM).
Each export after the first is compared with the first clip by clip: the mean difference, its
standard error, and on how many clips it is ahead.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from loong.evaluate.metrics import psnr, ssim
from loong.train.tokenizer_config import tokenizer_train_preset
from loong.train.tokenizer_data import held_out_clips
from loong.video_tokenizer.model import VideoTokenizer


@torch.no_grad()
def scores(model: VideoTokenizer, clips: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """PSNR and SSIM of each clip, ``(N, 2)``."""
    out = []
    for video in clips.split(batch):
        recon = model(video).recon
        out.append(torch.stack([psnr(recon, video), ssim(recon, video)], dim=1))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", help="tokenizer export directories")
    parser.add_argument("--labels", nargs="+", help="one name per export (default: the paths)")
    parser.add_argument("--clips", type=int, default=64, help="clips of each set (default: 64)")
    parser.add_argument("--sets", type=int, nargs="+", default=[0, 1, 2], help="data seeds")
    parser.add_argument("--preset", default="shapes", help="the clips' data config's preset")
    args = parser.parse_args()
    labels = args.labels or args.exports
    if len(labels) != len(args.exports):
        raise SystemExit(f"--labels: {len(labels)} given for {len(args.exports)} exports")

    data = tokenizer_train_preset(args.preset).data
    sets = [held_out_clips(dataclasses.replace(data, seed=s), args.clips) for s in args.sets]
    print(f"{args.clips} held-out clips of each data seed {args.sets}, {data.n_frames} frames")
    results = []
    for label, export in zip(labels, args.exports, strict=True):
        model = VideoTokenizer.from_pretrained(export).eval()
        per_set = [scores(model, clips) for clips in sets]
        every = torch.cat(per_set)  # (sets · clips, 2)
        results.append(every)
        by_set = "  ".join(
            f"seed {s}: {r[:, 0].mean():.2f}" for s, r in zip(args.sets, per_set, strict=True)
        )
        n = len(every)
        se = every[:, 0].std().item() / math.sqrt(n)
        print(
            f"{label}: PSNR {every[:, 0].mean():.2f} ± {se:.2f} dB, SSIM "
            f"{every[:, 1].mean():.3f} over {n} clips ({by_set})"
        )
    first = results[0]
    for label, every in zip(labels[1:], results[1:], strict=True):
        diff = every - first
        d, n = diff[:, 0], len(diff)
        print(
            f"{label} − {labels[0]}: PSNR {d.mean():+.2f} ± {d.std().item() / math.sqrt(n):.2f} "
            f"dB (ahead on {(d > 0).sum().item()} of {n} clips), SSIM {diff[:, 1].mean():+.3f}"
        )


if __name__ == "__main__":
    main()
