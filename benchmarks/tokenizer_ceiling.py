"""The fidelity a video tokenizer allows: the world's own videos, encoded and decoded, scored.

    python benchmarks/tokenizer_ceiling.py runs/recipe/tokenizer/export [more exports ...]
    python benchmarks/tokenizer_ceiling.py src/loong/models/shapes/tokenizer --seconds 60

No language model can score higher than its tokenizer lets it: this renders each canonical
prompt of ``loong bench fidelity`` (world seed 0), passes it through the tokenizer and scores
the reconstruction with the same pixel checks, one-second windows. It needs only a tokenizer
export, so tokenizer experiments can be compared before any LM is trained on them
(``loong bench fidelity --source tokenizer`` gives the same scores through an LM bundle).

Per prompt it also prints what the checks see in the reconstruction: the median fill ratio of the
largest blob (> 0.9 reads as a square, 0.65–0.9 a circle, < 0.65 a triangle), its median area
over the shape's true area (blur that spreads an object past the scorer's colour-distance
threshold makes it larger), the colour name most often measured, and the colour name of the
reconstruction's mean inside the world's own object one pixel in from its edge: when that is right
and the measured one is not, the colour was lost to the blur around the object, not inside it.

Last, whether the codes tell the palette's colours apart at all: a still large square of each
colour (world seed 0, the same place for all, black background) is encoded, and the ids of the
cells it covers, whole or in part, are compared across colours. A decoder cannot draw a colour its
codes do not carry: an id shared by two colours decodes to one colour for both.

And whether they tell the shapes apart: a still small red square, circle and triangle, each drawn
at the same place in twelve scenes (world seeds 0–11), are encoded and decoded. It prints the
share of object cells (cells that are not background for the square or the circle) whose id is
the same for the square and the circle, and each shape's median fill ratio after the round trip
(the world's own: 1.0, 0.78–0.87 and about 0.5).
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from loong.data.shapes import BACKGROUNDS, PALETTE, half_extent, parse_caption, render, shape_mask
from loong.evaluate.bench import CANONICAL_PROMPTS, reference_video
from loong.evaluate.fidelity import CHECKS, measure_frame, nearest_colour, score_video
from loong.video_tokenizer.model import VideoTokenizer


def report(
    directory: str, tokenizer: VideoTokenizer, seconds: float, fps: float = 8.0, size: int = 64
) -> None:
    n_frames = round(seconds * fps)
    print(f"{directory}: {len(CANONICAL_PROMPTS)} prompts × {n_frames} frames")
    header = f"{'prompt':52s} {'all':>5s} " + " ".join(f"{c:>8s}" for c in CHECKS)
    print(header + f" {'fill':>5s} {'area×':>6s}  colour seen / inside")
    windows = []
    for prompt in CANONICAL_PROMPTS:
        frames = reference_video(prompt, 0, n_frames, size, tokenizer)
        scored = score_video(frames, prompt, fps=fps)
        windows += scored
        scene = parse_caption(prompt)
        obj = scene.objects[0]
        true_area = int(shape_mask(obj.shape, half_extent(obj.size, size)).sum())
        seen = [m for m in (measure_frame(f) for f in frames) if m is not None]
        fill = np.median([m.fill_ratio for m in seen]) if seen else float("nan")
        area = np.median([m.area for m in seen]) / true_area if seen else float("nan")
        colour = Counter(m.colour for m in seen).most_common(1)[0][0] if seen else "-"
        world = reference_video(prompt, 0, n_frames, size, None)
        inside = interior_colour(frames, world, BACKGROUNDS[scene.background])
        shares = " ".join(f"{np.mean([w[c] for w in scored]):8.2f}" for c in CHECKS)
        all_share = np.mean([w["all"] for w in scored])
        measured = f"{fill:5.2f} {area:6.2f}  {colour} / {inside}"
        print(f"{prompt:52s} {all_share:5.2f} {shares} {measured}")
    shares = " ".join(f"{np.mean([w[c] for w in windows]):8.2f}" for c in CHECKS)
    print(f"{'all prompts':52s} {np.mean([w['all'] for w in windows]):5.2f} {shares}")


def interior_colour(frames: np.ndarray, world: np.ndarray, background: tuple[int, int, int]) -> str:
    """The palette name nearest the mean of ``frames`` (T, H, W, 3) over the pixels of the
    ``world``'s (T, H, W, 3) objects, drawn on ``background``, one pixel or more inside their
    edge."""
    inside = (world != np.array(background, dtype=world.dtype)).any(-1)  # (T, H, W)
    core = inside.copy()
    core[:, 1:] &= inside[:, :-1]
    core[:, :-1] &= inside[:, 1:]
    core[:, :, 1:] &= inside[:, :, :-1]
    core[:, :, :-1] &= inside[:, :, 1:]
    if not core.any():
        return "-"
    return nearest_colour(frames[core].astype(np.float64).mean(axis=0))


def still_video(frame: np.ndarray) -> torch.Tensor:
    """A uint8 frame (H, W, 3) as a one-frame video (1, 3, 1, H, W) in [-1, 1]."""
    return torch.from_numpy(frame).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1


def colour_codes(tokenizer: VideoTokenizer, size: int = 64) -> None:
    """Print how many of a still large square's object cells carry an id that another colour's
    square uses too, separately for cells the square covers whole and those on its edge."""
    cell = tokenizer.config.spatial_compression
    cells = {}  # colour → [(id, covered whole)]
    for colour in PALETTE:
        frame = render(
            parse_caption(f"a large {colour} square"), seed=0, n_frames=1, height=size, width=size
        )[0]  # (H, W, 3)
        video = still_video(frame)
        grid = tokenizer.encode(video)[0, 0]  # (h, w)
        inside = (frame != frame[0, 0]).any(-1)  # (H, W); the corner is background
        cover = inside.reshape(grid.shape[0], cell, grid.shape[1], cell).mean(axis=(1, 3))
        cells[colour] = [
            (int(i), c == 1.0)
            for i, c in zip(grid.flatten(), cover.flatten(), strict=True)
            if c > 0
        ]
    ids = {colour: {i for i, _ in mine} for colour, mine in cells.items()}
    for whole, name in ((True, "whole cells"), (False, "edge cells")):
        shared = total = 0
        for colour, mine in cells.items():
            others = set().union(*(theirs for c, theirs in ids.items() if c != colour))
            picked = [i for i, w in mine if w == whole]
            shared += sum(i in others for i in picked)
            total += len(picked)
        print(
            f"{name} of a large square with an id another colour's square uses: {shared} of {total}"
        )
    flat = {c: {i for i, w in mine if w} for c, mine in cells.items()}
    pairs = [f"{a}={b}" for a in flat for b in flat if a < b and flat[a] & flat[b]]
    print(f"colours whose whole cells share an id: {', '.join(pairs) or '-'}")


def shape_codes(tokenizer: VideoTokenizer, size: int = 64, scenes: int = 12) -> None:
    """Print how often a still square and circle at the same place get the same id in the cells
    they cover, and each shape's median fill ratio after a round trip through ``tokenizer``."""
    same = total = 0
    fills: dict[str, list[float]] = {"square": [], "circle": [], "triangle": []}
    for seed in range(scenes):
        grids = {}
        for shape in fills:
            frame = render(
                parse_caption(f"a red {shape}"), seed=seed, n_frames=1, height=size, width=size
            )[0]  # (H, W, 3); the scene's seed fixes the place, whatever the shape
            video = still_video(frame)
            indices = tokenizer.encode(video)  # (1, 1, h, w)
            recon = tokenizer.decode(indices)[0, :, 0].clamp(-1, 1)  # (C, H, W)
            pixels = ((recon + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            seen = measure_frame(pixels)
            fills[shape].append(seen.fill_ratio if seen else float("nan"))
            grids[shape] = indices[0, 0].numpy()
        ids, counts = np.unique(grids["square"], return_counts=True)
        background = ids[np.argmax(counts)]  # most cells are background
        covered = (grids["square"] != background) | (grids["circle"] != background)
        same += int((grids["square"][covered] == grids["circle"][covered]).sum())
        total += int(covered.sum())
    print(f"object cells with one id for a still square and circle at one place: {same} of {total}")
    print(
        "median fill after the round trip (stills): "
        + ", ".join(f"{shape} {np.nanmedian(v):.2f}" for shape, v in fills.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exports", nargs="+", help="video tokenizer export directories")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each video")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for directory in args.exports:
        tokenizer = VideoTokenizer.from_pretrained(directory).eval()
        report(directory, tokenizer, args.seconds)
        colour_codes(tokenizer)
        shape_codes(tokenizer)


if __name__ == "__main__":
    main()
