"""Pool several ``loong bench fidelity`` results into one figure, as if one run had made them all.

    OMP_NUM_THREADS=1 loong bench fidelity --model DIR --seconds 10 --seeds 1 2 3 --out runs/b/s13 &
    OMP_NUM_THREADS=1 loong bench fidelity --model DIR --seconds 10 --seeds 4 5 6 7 --out runs/b/s47
    python benchmarks/pool_fidelity.py runs/b/s13 runs/b/s47

Splitting the seeds over one-thread processes is the fast way to bench on a few cores; this puts
them back together. Prints the videos, the windows passing all five checks (of all windows), the
mean fidelity per span over videos (as ``loong bench fidelity`` reports it) and each check's
share of windows. Runs must share their fps, span and video length; a (prompt, seed) pair met
twice is an error, since it would count one video twice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from loong.evaluate.fidelity import CHECKS


def load(path: str) -> dict:
    """A fidelity.json, given the file or the bench's output directory."""
    file = Path(path)
    if file.is_dir():
        file = file / "fidelity.json"
    if not file.is_file():
        raise SystemExit(f"{path}: no fidelity.json; give a loong bench fidelity --out directory")
    return json.loads(file.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="fidelity.json files or their directories")
    args = parser.parse_args()

    results = [load(r) for r in args.runs]
    for key in ("fps", "span_seconds"):
        if len({r[key] for r in results}) > 1:
            raise SystemExit(f"the runs differ in {key}: {[r[key] for r in results]}")
    videos = [v for r in results for v in r["videos"]]
    lengths = {len(v["windows"]) for v in videos}
    if len(lengths) > 1:
        raise SystemExit(f"the runs' videos differ in length: {sorted(lengths)} windows")
    seen: set[tuple[str, int]] = set()
    for v in videos:
        if (v["prompt"], v["seed"]) in seen:
            raise SystemExit(f"({v['prompt']!r}, seed {v['seed']}) is in more than one run")
        seen.add((v["prompt"], v["seed"]))

    windows = np.array([v["windows"] for v in videos], dtype=bool)  # (videos, windows)
    spans = np.array([v["spans"] for v in videos], dtype=float)  # (videos, spans)
    print(f"{len(videos)} videos, {windows.size} windows")
    print(f"all five checks: {int(windows.sum())} windows ({windows.mean():.3f})")
    print("fidelity by span: " + " / ".join(f"{x:.3f}" for x in np.nanmean(spans, axis=0)))
    shares = {c: np.mean([v["checks"][c] for v in videos]) for c in CHECKS}
    print("checks (share of windows): " + ", ".join(f"{c} {s:.3f}" for c, s in shares.items()))


if __name__ == "__main__":
    main()
