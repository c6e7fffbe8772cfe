"""Plot held-out PSNR against training step for tokenizer runs (their metrics.jsonl) as a PNG.

    .venv/bin/python benchmarks/plot_training_curves.py runs/quality-lfq runs/quality-cvq \
        --labels LFQ CVQ --out docs/tokenizer_psnr.png

``--x minutes`` plots against wall time (the runs' ``elapsed_s``) instead: runs fitted to one
time budget differ in their step counts, not in their minutes. ``--target 32`` draws a
horizontal line at that PSNR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def eval_points(run: Path, x: str = "step") -> tuple[list[float], list[float]]:
    """The run's held-out PSNR evaluations: (steps or minutes, dB)."""
    where, values = [], []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval_psnr" in record:
            where.append(record["step"] if x == "step" else record["elapsed_s"] / 60)
            values.append(record["eval_psnr"])
    return where, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: folder names)")
    parser.add_argument("--title", default="Tokenizer: held-out PSNR during training")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument(
        "--x", choices=("step", "minutes"), default="step", help="the horizontal axis"
    )
    parser.add_argument("--target", type=float, help="draw a line at this PSNR (dB)")
    args = parser.parse_args()
    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error("give one label per run")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for run, label in zip(args.runs, labels, strict=True):
        where, values = eval_points(run, args.x)
        ax.plot(where, values, marker="o", markersize=3, label=label)
    if args.target is not None:
        ax.axhline(args.target, color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xlabel("training step" if args.x == "step" else "wall time (minutes)")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
