"""Plots for the ablations in BENCHMARKS.md: fidelity over the minute, and loss per latent frame.

    .venv/bin/python benchmarks/plot_ablations.py fidelity \
        runs/bench/main/fidelity.json runs/bench/no-reencode/fidelity.json \
        --labels "recipe" "no re-encoding" --ymax 0.2 --out docs/fidelity_ablations.png
    .venv/bin/python benchmarks/plot_ablations.py frame-loss runs/recipe/lm runs/ablate-flat/lm \
        --labels "re-weighted" "flat weights" --last 200 --out docs/lm_frame_loss.png

``frame-loss`` reads ``loss_frame_k`` (the unweighted cross-entropy of the tokens of latent frame
k, logged by ``loong lm train``) and averages it over the last ``--last`` training steps, so every
run is compared where it ended; it also prints the numbers as a table.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def frame_losses(run: Path, last: int) -> dict[int, float]:
    """Mean ``loss_frame_k`` over the log lines of the last ``last`` steps → {k: loss}."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]["step"]
    sums: dict[int, list[float]] = {}
    for record in records:
        if record["step"] <= final - last:
            continue
        for key, value in record.items():
            match = re.fullmatch(r"loss_frame_(\d+)", key)
            if match:
                sums.setdefault(int(match.group(1)), []).append(value)
    return {k: float(np.mean(v)) for k, v in sorted(sums.items())}


def plot_fidelity(paths: list[Path], labels: list[str], out: Path, ymax: float = 1.0) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for path, label in zip(paths, labels, strict=True):
        result = json.loads(path.read_text())
        span = result["span_seconds"]
        x = [(i + 0.5) * span for i in range(len(result["mean_spans"]))]
        ax.plot(x, result["mean_spans"], marker="o", label=label)
        print(label, " ".join(f"{v:.2f}" for v in result["mean_spans"]))
    ax.set(
        xlabel="time in video (s)",
        ylabel="fidelity (share of 1-s windows)",
        ylim=(-0.02 * ymax, 1.02 * ymax),
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_frame_loss(runs: list[Path], labels: list[str], last: int, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run, label in zip(runs, labels, strict=True):
        losses = frame_losses(run, last)
        ax.plot(list(losses), list(losses.values()), marker="o", label=label)
        print(f"{label:>24}: " + " ".join(f"{k}:{v:.3f}" for k, v in losses.items()))
    ax.set(xlabel="latent frame", ylabel=f"cross-entropy (last {last} steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("fidelity", "frame-loss"))
    parser.add_argument("inputs", nargs="+", type=Path, help="fidelity.json files or LM runs")
    parser.add_argument("--labels", nargs="+", required=True)
    parser.add_argument("--last", type=int, default=200, help="frame-loss: steps averaged")
    parser.add_argument(
        "--ymax", type=float, default=1.0, help="fidelity: top of the y axis (1: the whole scale)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if len(args.labels) != len(args.inputs):
        parser.error("give one label per input")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.kind == "fidelity":
        plot_fidelity(args.inputs, args.labels, args.out, args.ymax)
    else:
        plot_frame_loss(args.inputs, args.labels, args.last, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
