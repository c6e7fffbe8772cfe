"""Does an object stay on screen, and at its size? Per ten-second span.

    loong bench fidelity --model runs/recipe/bundle/lm --out runs/bench/recipe --save-videos
    python benchmarks/object_presence.py runs/bench/recipe [more bench directories ...]

Reads the mp4s a ``loong bench fidelity --save-videos`` run wrote and, in every fourth frame,
measures the largest blob as the fidelity scorer does (``loong.evaluate.fidelity.measure_frame``);
a frame counts when that blob has at least ``--min-area`` pixels, whatever its colour, shape or
motion. Fidelity asks for much more; this separates "the object is wrong" from "it is gone".
Second line: the median over those frames of the blob's area over the area the prompt's object
has in the world (the fidelity scorer's presence check asks for 0.5–2): an object that grows
fails presence as surely as one that fades. Third line: the median over one-second windows of
the blob centroid's mean step |Δx| + |Δy| between consecutive frames that both hold a blob,
over the step the caption implies (the scorer's speed check asks for 0.5–2): an object that
stalls reads under 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from loong.data.shapes import DIRECTIONS, parse_caption, pixel_speed
from loong.data.video import read_video
from loong.evaluate.fidelity import expected_area, measure_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="loong bench fidelity output directories")
    parser.add_argument("--span-seconds", type=float, default=10.0)
    parser.add_argument("--min-area", type=int, default=20, help="pixels of the largest blob")
    parser.add_argument("--every", type=int, default=4, help="measure every n-th frame")
    args = parser.parse_args()

    for run in args.runs:
        videos = sorted(Path(run, "videos").glob("*.mp4"))
        if not videos:
            raise SystemExit(f"{run}/videos holds no mp4: run loong bench fidelity --save-videos")
        jobs = json.loads(Path(run, "fidelity.json").read_text())["videos"]  # (prompt, seed)
        hits: dict[int, list[bool]] = {}
        sizes: dict[int, list[float]] = {}
        steps: dict[int, list[float]] = {}
        for path in videos:  # named {job index:02d}_seed{seed}.mp4
            frames, fps = read_video(path)  # (T, H, W, C) uint8
            obj = parse_caption(jobs[int(path.stem.split("_")[0])]["prompt"]).objects[0]
            expected = expected_area(obj, width=frames.shape[2])
            for i in range(0, len(frames), args.every):
                measure = measure_frame(frames[i])
                span = int(i / fps // args.span_seconds)
                present = measure is not None and measure.area >= args.min_area
                hits.setdefault(span, []).append(present)
                if present:
                    sizes.setdefault(span, []).append(measure.area / expected)
            if obj.direction is None:
                continue
            dx, dy = DIRECTIONS[obj.direction]
            implied = pixel_speed(obj.speed, frames.shape[2]) * (abs(dx) + abs(dy))
            window = max(2, round(fps))
            for start in range(0, len(frames) - 1, window):
                seen = [measure_frame(f) for f in frames[start : start + window]]
                moves = [
                    abs(b.centroid[0] - a.centroid[0]) + abs(b.centroid[1] - a.centroid[1])
                    for a, b in itertools.pairwise(seen)
                    if a is not None and b is not None
                ]
                if moves:
                    span = int(start / fps // args.span_seconds)
                    steps.setdefault(span, []).append(float(np.mean(moves)) / implied)
        shares = " ".join(f"{np.mean(hits[s]):.2f}" for s in sorted(hits))
        print(f"{run} ({len(videos)} videos): {shares}")
        ratios = " ".join(f"{np.median(sizes[s]):.2f}" if s in sizes else "-" for s in sorted(hits))
        print(f"{'':>{len(run)}} area / true area: {ratios}")
        moved = " ".join(f"{np.median(steps[s]):.2f}" if s in steps else "-" for s in sorted(hits))
        print(f"{'':>{len(run)}} step / caption's step: {moved}")


if __name__ == "__main__":
    main()
