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
- ``PSNR``: of the reconstruction, in dB;
- ``moved``: on single-object clips (``--moving`` of them, random captions, world seed n for
  clip n), the share of the object's cells whose id equals the id the object had one cell back
  along its path: objects move 4 or 8 pixels a latent frame, so every 2 or 1 latent frames they
  have moved one whole 8-pixel cell and the content of a cell is the earlier content of its
  neighbour. Windows where the object bounces are left out. A tokenizer whose ids depend only
  on the pixels in view gives 1.0, and a language model only has to move ids along; ids that
  also depend on what the cell saw earlier (a fully causal encoder's long memory) lower it;
- ``still``: the same for background cells the object has not touched in the compared frames:
  the share whose id did not change.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from loong.data.shapes import (
    DIRECTIONS,
    PALETTE,
    ShapesWorld,
    ShapesWorldConfig,
    parse_caption,
    render,
)
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


def cells_touched(mask: np.ndarray, t: int, r: int, cell: int) -> np.ndarray:
    """Object mask ``(T, H, W)`` → cells ``(h, w)`` the object covers in latent frame ``t``'s
    frames and the frame before them (the span a windowed encoder sees)."""
    span = mask[max(r * t - r, 0) : r * t + 1].any(0)  # (H, W)
    h, w = span.shape
    return span.reshape(h // cell, cell, w // cell, cell).any(axis=(1, 3))


@torch.no_grad()
def moved_and_still(path: str, n: int) -> tuple[float, float]:
    """Share of object cells whose id moved along with the object, and of untouched background
    cells whose id stayed, over ``n`` single-object clips (see the module docstring)."""
    model = VideoTokenizer.from_pretrained(path).float().eval()
    r, cell = model.config.temporal_compression, model.config.spatial_compression
    rng = np.random.default_rng(0)
    moved, still = [], []
    for i in range(n):
        direction = str(rng.choice(list(DIRECTIONS)))
        speed = str(rng.choice(["slowly", "quickly"]))
        caption = (
            f"a {rng.choice(['small', 'large'])} {rng.choice(list(PALETTE))} "
            f"{rng.choice(['circle', 'square', 'triangle'])} moves {direction} {speed}"
        )
        frames = render(parse_caption(caption), seed=i, n_frames=33, height=64, width=64)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        ids = model.encode(video)[0].numpy()  # (t, h, w)
        h, w = ids.shape[1:]
        mask = np.abs(frames.astype(int) - frames[0, 0, 0].astype(int)).sum(-1) > 0
        centre = np.array([np.argwhere(m).mean(0) for m in mask])  # (T, 2) y, x
        step = np.diff(centre, axis=0)  # (T − 1, 2) pixels a frame
        lag = cell // (r * (1 if speed == "slowly" else 2))  # latent frames to move one cell
        for t in range(1 + lag, ids.shape[0]):
            seg = step[max(r * (t - lag) - r - 1, 0) : r * t]
            if np.abs(seg - seg[0]).max() > 1e-6:
                continue  # a bounce in view
            dy, dx = np.sign(seg[0]).astype(int)  # the way it moves now (after earlier bounces)
            now, before = cells_touched(mask, t, r, cell), cells_touched(mask, t - lag, r, cell)
            for y, x in zip(*np.nonzero(now), strict=True):
                if 0 <= y - dy < h and 0 <= x - dx < w and before[y - dy, x - dx]:
                    moved.append(ids[t, y, x] == ids[t - lag, y - dy, x - dx])
            untouched = ~now & ~before
            still.extend((ids[t][untouched] == ids[t - lag][untouched]).tolist())
    return float(np.mean(moved)), float(np.mean(still))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", help="video tokenizer export directories")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--moving", type=int, default=64, help="single-object clips for moved")
    args = parser.parse_args()
    video = clips(args.clips)
    print(
        f"{'tokenizer':50s} {'bg share':>9s} {'repeat':>7s} {'ids/clip':>9s} {'PSNR':>6s} "
        f"{'moved':>6s} {'still':>6s}"
    )
    for path in args.exports:
        m = measure(path, video)
        moved, still = moved_and_still(path, args.moving)
        print(
            f"{path:50s} {m['bg share']:9.3f} {m['repeat']:7.3f} "
            f"{m['ids/clip']:9.1f} {m['PSNR']:6.2f} {moved:6.3f} {still:6.3f}"
        )


if __name__ == "__main__":
    main()
