"""How predictable are a video tokenizer's codes? Background share and frame-to-frame repeats.

    python benchmarks/token_stability.py runs/recipe/tokenizer/export [more exports ...]

A shapes-world clip is a flat background with one or two small objects, so an encoder whose
tokens depend only on their own cell of pixels gives one id to every background cell, and that id
stays put from one latent frame to the next. A language model then only has to learn where the
objects go. An encoder whose tokens see the whole frame gives background cells ids that change
with the object's distance, which the language model must learn to predict as well.

For each export, encodes the same held-out clips (33 frames, 9 latent frames; world seed 1,
which training never uses) and prints, averaged over clips and latent frames:

- ``bg share``: share of a latent frame's ids equal to that frame's most common id;
- ``repeat``: share of ids equal to the id at the same place one latent frame earlier;
- ``ids/clip``: distinct ids in one clip;
- ``PSNR``: of the reconstruction, in dB.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from loong.data.shapes import ShapesWorld, ShapesWorldConfig
from loong.video_tokenizer.model import VideoTokenizer


def clips(n: int) -> torch.Tensor:
    world = ShapesWorld(ShapesWorldConfig(n_frames=33, seed=1))
    frames = np.stack([world.sample(i)[3] for i in range(n)])  # (N, T, H, W, 3) uint8
    video = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float()  # (N, 3, T, H, W)
    return video / 127.5 - 1


@torch.no_grad()
def measure(path: str, video: torch.Tensor) -> dict[str, float]:
    model = VideoTokenizer.from_pretrained(path).float().eval()
    ids = model.encode(video)  # (N, t, h, w)
    recon = model.decode(ids).clamp(-1, 1)
    flat = ids.flatten(2)  # (N, t, h·w)
    mode = flat.mode(dim=-1).values  # (N, t)
    bg_share = (flat == mode[..., None]).float().mean().item()
    repeat = (flat[:, 1:] == flat[:, :-1]).float().mean().item()
    per_clip = np.mean([len(torch.unique(clip)) for clip in ids])
    mse = ((recon - video) / 2).pow(2).flatten(1).mean(1)  # (N,) on a [0, 1] scale
    psnr = (-10 * torch.log10(mse)).mean().item()
    return {"bg share": bg_share, "repeat": repeat, "ids/clip": per_clip, "PSNR": psnr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", help="video tokenizer export directories")
    parser.add_argument("--clips", type=int, default=32)
    args = parser.parse_args()
    video = clips(args.clips)
    print(f"{'tokenizer':50s} {'bg share':>9s} {'repeat':>7s} {'ids/clip':>9s} {'PSNR':>6s}")
    for path in args.exports:
        m = measure(path, video)
        print(
            f"{path:50s} {m['bg share']:9.3f} {m['repeat']:7.3f} "
            f"{m['ids/clip']:9.1f} {m['PSNR']:6.2f}"
        )


if __name__ == "__main__":
    main()
