"""What a budgeted tokenizer run's re-fits (``loong.train.budget.Refit``) do with a run's
real step times: replays ``RUN/metrics.jsonl`` through them, the first re-fit and the rest of
the run's from each later kind of step.

Give the command the run was started with (its preset, ``--steps``, ``--minutes`` and
``--set``s): the config is rebuilt from it and checked against the one ``RUN/budget.json`` was
fitted to. Steps come from the metrics' ``elapsed_s`` (every ``log_every`` steps, so each step of
a span gets the span's mean); spans with an evaluation, preview or checkpoint in them are left
out, as the loop leaves an event's time out of its step, and so is the first (the run's start)
and any a resume restarted ``elapsed_s`` in; so the replay re-fits a little later than the run
would (the steps of the spans left out are not counted towards ``due``). Each step's kind is
the one it had in the run (``RUN/config.json``), whatever the replay's re-fits move. With
``--late`` the late and clock checks run too, on the run's ``elapsed_s``; once a replayed re-fit
has moved the run's end they still read the run's own steps, so take what they say up to the
first that the run did not make. The run's files are not changed.

    python benchmarks/budget_refit_replay.py runs/exp36/cvq_whole_c10_fit_aborted --preset shapes \\
        --steps 9600 --minutes 30 --set 'model.quantizer.kind="cvq"' ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
from pathlib import Path

from loong.config import resolve_config
from loong.train.budget import (
    BUDGET_FILE,
    NEVER,
    TOKENIZER,
    Refit,
    config_sha256,
    run_minutes,
)
from loong.train.tokenizer_config import tokenizer_train_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--preset", default="shapes")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--late", action="store_true",
        help="also the late and clock checks, on the run's own elapsed_s (each step of a span "
        "at the span's start plus its share of it)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    sets = [*args.set, f"budget_minutes={args.minutes}"]
    sets += [f"steps={args.steps}"] if args.steps is not None else []
    configured = resolve_config(tokenizer_train_preset(args.preset), None, sets)
    record = json.loads((args.run / BUDGET_FILE).read_text())
    base = dataclasses.replace(configured, budget_minutes=0.0, max_minutes=0.0)
    if config_sha256(base) != record["config"]:
        raise SystemExit(f"{args.run}: these options are not the command its budget was fitted to")
    fitted = TOKENIZER.scale(base, record.get("calibrated_factor", record["factor"]))
    if args.late:  # the stop the run had, which the late checks fit the rest into
        spent = record["calibration"]["seconds"] + record["calibration"]["setup"]
        stop = record["minutes"] - spent / 60
        fitted = dataclasses.replace(fitted, budget_minutes=record["minutes"], max_minutes=stop)
    ran = json.loads((args.run / "config.json").read_text())  # the steps' kinds in the run
    intervals = (ran["eval_every"], ran["preview_every"], ran["checkpoint_every"])
    gan_start = ran["loss"]["disc_start_step"] if ran["loss"]["gan_weight"] > 0 else NEVER
    rows = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines()]

    with tempfile.TemporaryDirectory() as scratch:
        record.pop("refit", None)
        record.pop("rest", None)
        record["factor"] = record.pop("calibrated_factor", record["factor"])
        (Path(scratch) / BUDGET_FILE).write_text(json.dumps(record))
        refit = Refit(configured, fitted, Path(scratch), TOKENIZER, resumed=False)
        print(
            f"calibrated {record['calibration']['step']:.3f} s a step, factor "
            f"{record['factor']:.3f} ({fitted.steps} steps); re-fit after {refit.due} steps"
        )
        previous = {"step": 0, "elapsed_s": 0.0}
        for row in rows:
            span = range(previous["step"] + 1, row["step"] + 1)
            # the events after the span's first step's predecessor up to its last but one (the
            # first span's: the run's start); an event's time lands in the next step's elapsed_s
            before = range(previous["step"], row["step"])
            seconds = (row["elapsed_s"] - previous["elapsed_s"]) / len(span)
            if seconds > 0 and not any(s % i == 0 for s in before for i in intervals):
                for k, step in enumerate(span, 1):  # its 0-based index step - 1
                    about = (step - 1 >= ran["continuous_steps"], step - 1 >= gan_start)
                    elapsed = previous["elapsed_s"] + k * seconds if args.late else None
                    new = refit.observe(step, seconds, about, elapsed)
                    if new is not None:
                        fitted = new
                        print(
                            f"re-fitted at step {step}: {new.steps} steps, the quantizer from "
                            f"{new.continuous_steps}, the GAN from {new.loss.disc_start_step}"
                        )
            previous = row
            if not refit.active:
                break
        if not refit.timed:
            print("the run's metrics end before its first re-fit")
        after = json.loads((Path(scratch) / BUDGET_FILE).read_text())
        print(json.dumps({key: after[key] for key in ("refit", "rest") if key in after}))
        measured = TOKENIZER.measured(TOKENIZER.costs_from(record["calibration"]), refit.timed, 1)
        print(
            f"{fitted.steps} steps, projected at the steps' measured times: "
            f"{run_minutes(TOKENIZER, fitted, measured):.1f} min of {record['minutes']:g}"
        )


if __name__ == "__main__":
    main()
