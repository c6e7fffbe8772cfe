"""A budgeted training run whose machine slows down half-way: does it still end its schedule?

Runs ``loong tokenizer train ... --minutes M`` (the arguments after ``--``) in a subprocess and,
``--load-after`` seconds after its first training step, starts a competing load beside it (a
process multiplying matrices on ``--load-threads`` threads) until the run ends, or for
``--load-seconds`` (a slow spell). Then prints,
from the run's ``budget.json``, ``config.json`` and ``metrics.jsonl``: the steps it was fitted
to and ended with, the steps it took, its learning rate at its last step against the peak, its
largest change of learning rate between two logged steps (a re-fit that moved the schedule),
the budget's re-fits, and its wall time against the budget.

    python benchmarks/budget_slowdown.py --out runs/slow --load-after 240 -- \\
        loong tokenizer train --preset shapes --minutes 8

A run that fits its last steps into the time left (``loong.train.budget.Refit``'s late checks)
takes every step it ends with and decays its learning rate; one that does not reaches the
budget's stop with steps to go. ``--out`` is passed on as the run's ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_model

LOAD = """
import torch
torch.set_num_threads({threads})
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a)
"""


def _first_step_seen(metrics: Path) -> bool:
    return metrics.is_file() and metrics.stat().st_size > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the run's --out (a new directory)")
    parser.add_argument("--load-after", type=float, default=240.0, help="seconds after step 1")
    parser.add_argument("--load-threads", type=int, default=2, help="threads of the load")
    parser.add_argument(
        "--load-seconds", type=float, default=0.0, help="stop the load after this long (0: never)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command")
    args = parser.parse_args()
    command = [c for c in args.command if c != "--"]
    if not command:
        parser.error("give the training command after --")
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists: give a new --out")
    began = time.monotonic()
    run = subprocess.Popen([*command, "--out", str(out)])
    load = None
    metrics = out / "metrics.jsonl"
    try:
        while run.poll() is None and not _first_step_seen(metrics):
            time.sleep(1.0)
        first_step = time.monotonic()
        while run.poll() is None and time.monotonic() - first_step < args.load_after:
            time.sleep(1.0)
        if run.poll() is None:
            code = LOAD.format(threads=args.load_threads)
            load = subprocess.Popen([sys.executable, "-c", code])
            print(f"load started {time.monotonic() - began:.0f} s after the command", flush=True)
        if args.load_seconds > 0:
            try:
                run.wait(timeout=args.load_seconds)
            except subprocess.TimeoutExpired:
                load.kill()
                stopped = time.monotonic() - began
                print(f"load stopped {stopped:.0f} s after the command", flush=True)
        run.wait()
    finally:
        if load is not None:
            load.kill()
        if run.poll() is None:
            run.kill()
    wall = time.monotonic() - began
    budget = json.loads((out / "budget.json").read_text())
    config = json.loads((out / "config.json").read_text())
    records = [json.loads(line) for line in metrics.open()]
    last = records[-1]
    peak = max(r["lr"] for r in records)
    refits = [budget.get("refit", {}), *budget.get("rest", [])]
    print(f"machine: {cpu_model()}; command: {' '.join(command)}")
    print(f"budget {budget['minutes']:g} min; wall {wall / 60:.2f} min (calibration included)")
    print(f"fitted factor {budget.get('calibrated_factor', budget['factor']):.3f}")
    print(f"steps at the end: {config['steps']}; taken: {last['step']}")
    print(f"learning rate at the last step: {last['lr']:.3g} ({last['lr'] / peak:.3f} of its peak)")
    top = next(i for i, r in enumerate(records) if r["lr"] == peak)
    decay = records[top:]  # the warm-up's rise left out
    jump, at = max((abs(b["lr"] - a["lr"]) / peak, b["step"]) for a, b in itertools.pairwise(decay))
    print(
        f"largest change of the learning rate between two logged steps after its peak: "
        f"{jump:.3f} of the peak (step {at})"
    )
    print("re-fits: " + json.dumps([r for r in refits if r]))
    sys.exit(run.returncode)


if __name__ == "__main__":
    main()
