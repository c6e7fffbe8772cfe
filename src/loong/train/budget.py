"""Fit a training run into a wall-time budget: time a few real steps, then scale the step counts.

A run's step counts are set on one machine; on a slower one a hard stop (``max_minutes``) would
end the run part-way through its schedule: the learning rate still high, the quantizer perhaps
never on (``continuous_steps``), the GAN phase or the LM's last, longest stage never reached.
With a budget the run first times a few real steps on this machine, through the training loop
itself in a scratch directory (:func:`calibrate_tokenizer`, :func:`calibrate_lm`), projects the
whole run from them (:func:`tokenizer_seconds`, :func:`lm_seconds`), and scales every count
that buys time by one factor (:func:`scale_tokenizer`, :func:`scale_lm`, found by :func:`fit`)
so that the whole schedule completes inside the budget: the tokenizer's steps and the steps its
quantizer and GAN phase start at, every LM stage's steps, and the evaluation, preview and
checkpoint intervals (so there are as many of each), and the learning rate's warm-up (so that
a run cut deep still decays its rate). The peak learning rate stays. The factor is never
above 1: a machine fast enough runs the configured steps.

``budget_minutes`` of the tokenizer's and the LM's training configs turns it on
(:func:`fit_run`; ``loong tokenizer train --minutes``, ``loong lm train --minutes``), for
single-process runs; ``loong recipe shapes`` fits all its phases together the same way
(:mod:`loong.recipe_budget`, which builds on the pieces here) and then hands its language
model a budget of its own from those costs (:func:`budget_from_costs`). The factor follows the speed
measured, which on a shared machine moves by several percent from one minute to the next, so two
budgeted runs may train different step counts; a resumed run keeps the factor it started with
(``OUT/budget.json``).

A calibration times a handful of steps, so a slow (or fast) minute of a shared machine during
them mis-sizes the whole run: one 30-minute tokenizer run was fitted to 0.39 of its steps from a
calibration that timed 0.42 s a step, and then stepped at 0.27 s. So a budgeted run fits its
factor once more from its own steps (:class:`Refit`): after ``REFIT_SHARE`` of them, when their
median time is more than ``REFIT_TOLERANCE`` away from the calibrated one, the calibrated costs
are scaled by that ratio and the factor fitted again. Early, so that the learning rate's schedule
and the phases' starts move little; once, and recorded in ``budget.json`` (``refit``, with the
calibration's ``calibrated_factor``), so that a resumed run keeps the re-fitted factor.

That first re-fit times one kind of step (a tokenizer's warm-start steps, an LM's first stage's
lengths) and takes its ratio for every kind, but a calibration can be off by a different ratio
for each: one 30-minute tokenizer's warm-start steps ran at 0.83× their calibrated time and its
quantized steps at 1.0×, so the re-fit gave it steps it had no time for and the budget's stop cut
it before its last 225; a busy calibration slowed an LM's lengths 1, 5 and 9 by 0.08×, 0.09× and
0.21×. So each later kind of step is timed too, over its own first steps, and when its ratio is
more than ``REFIT_TOLERANCE`` off the one the run was fitted with, the rest of the run is fitted
again (:func:`rest_tokenizer`, :func:`rest_lm`): the steps still to come, and the phases still
to start, scale by one share so that the whole run, its kinds of step each at their own measured
speed, fits the budget; the steps taken and the phases begun stay as they are, and the learning
rate goes on from where it was, its schedule run at the new pace (``OptimConfig.rescaled``;
following the new total instead, a rate would jump down when a re-fit cuts the rest of the
run). Each is recorded in ``budget.json`` (``rest``) and replayed on resume; a
resumed run times no more kinds.

A machine can also slow down later in a run (another job starts beside it), and a run fitted to
its early speed would then reach the budget's stop with its steps unfinished, its learning rate
undecayed. So once its kinds are timed, a run keeps timing its steps and, each time it has timed
as many new ones as a re-fit times (or fewer that took as long as two such windows at the speed
fitted: a run 14× slower, as a 1-thread load made one on a 2-core Xeon, would wait fourteen
windows' time), when their median is more than ``LATE_TOLERANCE`` off the time their kinds were
fitted at, fits the steps still to come into the time left before the stop, at that speed
(recorded in ``rest`` with the kind ``"late"``). Both ways: a run whose machine is free again
gets steps back, up to the configured ones, so that a slow spell of a minute does not shorten
the rest of the run for good. A window's median leaves out the steps that stalled, which a
2-core machine shared by more threads than cores does for a minute or more at a time, but the
stop counts their seconds: so a check that finds the median as fitted also reads the run's clock
over its last ``CLOCK_WINDOWS`` windows (its seconds over those it was fitted to spend on them,
events and stalls included) and, when the steps still to come would overrun the time left at
that pace, fits them into it at that pace; when the pace is more than ``AHEAD_TOLERANCE`` faster
than the one they were fitted at (the stalls stopped, a single one has left the windows, or the
machine is faster than in the spell the run was last fitted to), it gives them back
(``"clock"`` in ``rest``, with the pace). A stall the budget's margin holds moves nothing; a
stall of a minute near the end of a short run still outruns any check between steps
(BENCHMARKS.md, "The learning rate across a re-fit, and stalls a window's median does not
see").
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import shutil
import statistics
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from loong.config import config_json
from loong.pretrained import atomic_write_text
from loong.train.lm_config import LMTrainConfig, StageConfig, scale_stages
from loong.train.optim import OptimConfig
from loong.train.tokenizer_config import TokenizerTrainConfig

log = logging.getLogger(__name__)

STEPS = 5
"""Timed steps of each kind: the first of each is left out (allocation, compilation). The
calibration runs' event intervals assume at least 2."""
MIN_FACTOR = 0.05
"""Below this share of the configured steps a run trains nothing worth keeping."""
AIM = 0.92
"""The share of the budget the projection is fitted to: step times vary by a few percent from
the calibration's (the first budgeted recipe measured ran 3.7% over its projection)."""
NEVER = 10**9
"""An interval no calibration run reaches."""
BUDGET_FILE = "budget.json"
REFIT_SHARE = 0.03
"""The share of a budgeted run's steps it times before fitting its factor again (``Refit``)."""
REFIT_MIN_STEPS = 20
"""The fewest steps a re-fit times. A re-fit must come within twice ``REFIT_SHARE`` of the run as
fitted or as re-fitted, so runs of fewer than about 380 steps keep their factor (and stop at
their budget) unless their steps run fast enough to re-fit them to a run that long (after a
calibration timed in a busy minute)."""
REFIT_SKIP = 3
"""Steps left out at the start of a re-fit's timing (allocation, compilation)."""
REFIT_TOLERANCE = 0.10
"""How far the run's median step time may be from the calibration's before the factor is fitted
again: wider than the few percent a machine's speed moves by from one minute to the next. Each
step is compared with its own kind's calibrated cost (a tokenizer's steps before its quantizer
starts with ``TokenizerCosts.continuous_step``: with 16,384 CVQ codes they are much cheaper)."""
AHEAD_TOLERANCE = 0.10
"""How much faster than the pace the rest of a run was last fitted at its clock may run (over
``CLOCK_WINDOWS`` windows, events and stalls included) before the steps are given back, up to
the configured ones: tighter than ``LATE_TOLERANCE``, since a run fitted to a slow spell and
then faster only ends early (a 30-minute tokenizer run re-fitted to steps 1.10× slower than
calibrated, which then ran at 0.80× that, ended after 25.3 minutes of training), where giving
steps back risks a later check's shrink, fitted from the clock again."""
LATE_TOLERANCE = 0.25
"""How far a window of a run's latest steps may be from the speed the run was fitted at before
the rest of the run is fitted again late in it: wider than ``REFIT_TOLERANCE``, since a
machine's speed moves by up to ~20% from one window of ~70 steps to the next (0.79–1.20× on a
2-core AMD EPYC, nothing else running), where another job beside the run makes it 2–5× slower."""
CLOCK_WINDOWS = 4
"""How many windows of a run's latest steps the clock's pace is measured over (``Refit``): long
enough to average a stalling machine's stalls, short enough to see them stop."""

Run = TypeVar("Run")


@dataclass(kw_only=True)
class TokenizerCosts:
    """Seconds of each unit of work of a tokenizer run on this machine."""

    step: float
    """One training step (quantized, no GAN)."""
    gan_step: float
    """One with the GAN on (the discriminator's update included)."""
    event: float
    """An evaluation with a preview and a checkpoint, on top of its step."""
    setup: float
    """The run's start, first step's warm-up, last evaluation and export."""
    seconds: float = 0.0
    """Wall time the calibration took."""
    continuous_step: float | None = None
    """One step before the quantizer starts (``continuous_steps``); None (a run without that
    phase, or a record from before it was timed): as ``step``."""
    evaluation: float | None = None
    """An evaluation alone, on top of its step; None (a record from before each event was
    timed apart): every event, alone or not, costs ``event``."""
    preview: float | None = None
    """A preview alone, on top of its step."""
    checkpoint: float | None = None
    """A checkpoint alone, on top of its step."""

    def events_seconds(self, steps: int, *intervals: int) -> float:
        """Seconds of the evaluations, previews and checkpoints of a run of ``steps`` steps,
        on top of their steps, given their ``intervals`` in that order: each kind at its own
        cost where they were timed apart, else each step with any of them at ``event``."""
        costs = (self.evaluation, self.preview, self.checkpoint)
        if None in costs:
            return events(steps, *intervals) * self.event
        return sum(events(steps, n) * cost for n, cost in zip(intervals, costs, strict=True))

    @property
    def warm_start_step(self) -> float:
        """Seconds of a step before the quantizer starts."""
        return self.step if self.continuous_step is None else self.continuous_step


def step_times(metrics: Path) -> list[float]:
    """Each step's seconds from a run's metrics.jsonl (``elapsed_s`` of every step)."""
    elapsed = [json.loads(line)["elapsed_s"] for line in metrics.read_text().splitlines()]
    return [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]


def events(steps: int, *intervals: int) -> int:
    """Steps 1..steps at which one of the intervals falls, and the last (by inclusion and
    exclusion over the intervals' least common multiples)."""
    distinct = sorted(set(intervals))
    hits = sum(
        (-1) ** (r + 1) * (steps // math.lcm(*subset))
        for r in range(1, len(distinct) + 1)
        for subset in itertools.combinations(distinct, r)
    )
    return hits + (0 if any(steps % i == 0 for i in distinct) else 1)


def scaled(n: int, share: float, least: int = 1) -> int:
    """``n`` times ``share``, rounded, at least ``least``."""
    return max(least, round(n * share))


def calibrate_tokenizer(tok: TokenizerTrainConfig, scratch: Path, *, gan: bool) -> TokenizerCosts:
    """Costs of the tokenizer run ``tok`` (its GAN steps timed when ``gan``), from a short run
    of the training loop in ``scratch`` (left there: its export is a tokenizer to time more
    work with)."""
    from loong.train.tokenizer import train_tokenizer  # it fits its own runs with this module

    started = time.monotonic()
    c = STEPS + 1 if tok.continuous_steps > 0 else 0  # continuous steps, the first a warm-up
    # quantized steps, the first a warm-up; after the last but three a checkpoint, after the
    # last but two a preview, after the last but one an evaluation: each delays the next step
    n = 2 * STEPS + 4
    q = c + n  # steps before the GAN's
    run = dataclasses.replace(
        tok,
        steps=q + (STEPS + 1 if gan else 0),  # then GAN steps, the first a warm-up
        continuous_steps=c,
        loss=dataclasses.replace(tok.loss, disc_start_step=q if gan else NEVER),
        eval_every=q - 1,
        preview_every=q - 2,
        checkpoint_every=q - 3,  # none falls twice: 2 (q - 3) > q + STEPS + 1
        log_every=1,
        max_minutes=0.0,
        budget_minutes=0.0,
    )
    times = step_times(train_tokenizer(run, scratch, progress=False).parent / "metrics.jsonl")
    wall = time.monotonic() - started
    step = statistics.median(times[c + 1 : q - 3])
    continuous = statistics.median(times[1:c]) if c else None
    setup = wall - sum(times) + max(0.0, times[0] - (continuous or step))
    if c:  # the quantizer's first step: a warm-up too
        setup += max(0.0, times[c] - step)
    # the event after step k (1-based) delays step k + 1, whose seconds are times[k]
    checkpoint, preview, evaluation = (max(0.0, times[k] - step) for k in (q - 3, q - 2, q - 1))
    return TokenizerCosts(
        step=step,
        gan_step=statistics.median(times[q + 1 :]) if gan else step,
        event=evaluation + preview + checkpoint,
        setup=max(0.0, setup),
        seconds=wall,
        continuous_step=continuous,
        evaluation=evaluation,
        preview=preview,
        checkpoint=checkpoint,
    )


def has_gan_phase(tok: TokenizerTrainConfig) -> bool:
    return tok.loss.gan_weight > 0 and tok.loss.disc_start_step < tok.steps


def tokenizer_seconds(tok: TokenizerTrainConfig, costs: TokenizerCosts) -> tuple[float, float]:
    """Seconds of ``tok``'s run on the calibrated machine: (the part that scales with the step
    counts, the part that does not)."""
    n_gan = tok.steps - tok.loss.disc_start_step if has_gan_phase(tok) else 0
    n_continuous = min(tok.continuous_steps, tok.steps - n_gan)
    n_plain = tok.steps - n_gan - n_continuous
    variable = n_continuous * costs.warm_start_step + n_plain * costs.step + n_gan * costs.gan_step
    intervals = (tok.eval_every, tok.preview_every, tok.checkpoint_every)
    return variable, costs.events_seconds(tok.steps, *intervals) + costs.setup


def _later(n: int, done: int, share: float) -> int:
    """Step ``n`` of a run whose steps after ``done`` scale by ``share``."""
    return n if n <= done else done + scaled(n - done, share)


def _moved(tok: TokenizerTrainConfig, at: Callable[[int, int], int]) -> TokenizerTrainConfig:
    """``tok`` with its steps and its phases' start steps moved by ``at(n, least)``; the phases
    stay valid (a continuous phase and a configured GAN phase end before the last step)."""
    steps = at(tok.steps, 1)
    continuous = min(at(tok.continuous_steps, 0), steps - 1)
    disc_start = at(tok.loss.disc_start_step, 0)
    if tok.loss.disc_start_step < tok.steps:  # a GAN phase configured stays
        disc_start = min(disc_start, steps - 1)
    return dataclasses.replace(
        tok,
        steps=steps,
        continuous_steps=continuous,
        loss=dataclasses.replace(tok.loss, disc_start_step=disc_start),
    )


def _rescaled(optim: OptimConfig, done: int, steps: int, now: int) -> OptimConfig:
    """``optim`` for a run of ``steps`` whose steps after ``done`` became ``now`` in all: its
    schedule goes on from step ``done`` at the new pace (``OptimConfig.rescaled``)."""
    if steps <= done or now == steps:
        return optim
    ratio = (now - done) / (steps - done)
    return dataclasses.replace(optim, rescaled=(*optim.rescaled, (done, ratio)))


def _same_warmup(run: Run, like: Run) -> Run:
    """``run`` with the warm-up of ``like``: a run's warm-up is scaled once, by its calibrated
    factor, so that a re-fit of the factor in it leaves its learning rate where it was."""
    return dataclasses.replace(
        run, optim=dataclasses.replace(run.optim, warmup_steps=like.optim.warmup_steps)
    )


def _warmup(optim: OptimConfig, share: float) -> OptimConfig:
    """``optim`` with its warm-up steps times ``share`` (a warm-up stays one)."""
    least = min(1, optim.warmup_steps)
    return dataclasses.replace(optim, warmup_steps=scaled(optim.warmup_steps, share, least))


def rest_tokenizer(tok: TokenizerTrainConfig, done: int, share: float) -> TokenizerTrainConfig:
    """``tok`` with its steps after ``done``, and the starts of its phases still to come, times
    ``share``, its learning rate going on from step ``done`` at the new pace; the steps taken
    and the phases begun stay, and so do the event intervals."""
    if share == 1.0:
        return tok
    new = _moved(tok, lambda n, least: _later(n, done, share))
    return dataclasses.replace(new, optim=_rescaled(tok.optim, done, tok.steps, new.steps))


def scale_tokenizer(tok: TokenizerTrainConfig, share: float) -> TokenizerTrainConfig:
    """``tok`` with its steps, its phases' start steps, its warm-up and its event intervals
    times ``share``; ``share`` = 1 returns ``tok`` itself."""
    if share >= 1.0:
        return tok
    return dataclasses.replace(
        _moved(tok, lambda n, least: scaled(n, share, least)),
        optim=_warmup(tok.optim, share),
        eval_every=scaled(tok.eval_every, share),
        preview_every=scaled(tok.preview_every, share),
        checkpoint_every=scaled(tok.checkpoint_every, share),
    )


@dataclass(kw_only=True)
class LMCosts:
    """Seconds of each unit of work of a language-model run on this machine."""

    step: dict[int, float]
    """One step by latent length t."""
    compile: float
    """The steps' first-call overhead (compilation), all lengths."""
    event: float
    """An evaluation with a checkpoint, on top of its step."""
    setup: float
    """The run's start (data, model), last evaluation and export."""
    seconds: float = 0.0
    """Wall time the calibration took."""

    @classmethod
    def from_record(cls, record: dict) -> LMCosts:
        """Costs from their ``dataclasses.asdict`` as JSON stored them (lengths as strings)."""
        return cls(**(record | {"step": {int(t): s for t, s in record["step"].items()}}))


def calibrate_lm(lm: LMTrainConfig, scratch: Path) -> LMCosts:
    """Costs of the language-model run ``lm`` on its own data, from a short run of the training
    loop in ``scratch``.

    Two passes over the stages' latent lengths, ``STEPS`` steps each, with an evaluation and a
    checkpoint at the end of each pass: the first pass compiles (the blocks for each new shape
    until they go dynamic, the evaluation's forward), the second is timed."""
    from loong.train.lm import train_lm  # it fits its own runs with this module

    lengths = sorted({t for stage in lm.stages for t in stage.lengths})
    stages = [StageConfig(name=f"calibration t={t}", steps=STEPS, lengths=(t,)) for t in lengths]
    stages *= 2
    stages[-1] = dataclasses.replace(stages[-1], steps=STEPS + 1)  # its last step waits
    warm = STEPS * len(lengths)
    run = dataclasses.replace(
        lm,
        stages=tuple(stages),
        eval_every=warm,  # after each pass
        checkpoint_every=warm,
        log_every=1,
        max_minutes=0.0,
        budget_minutes=0.0,
        tensorboard=False,
    )
    started = time.monotonic()
    times = step_times(train_lm(run, scratch, progress=False).parent / "metrics.jsonl")
    wall = time.monotonic() - started
    per_length = {}
    for i, t in enumerate(lengths):
        start = warm + i * STEPS
        per_length[t] = statistics.median(times[start + 1 : start + STEPS])  # not the first
    event = max(0.0, times[-1] - per_length[lengths[-1]])
    first_pass = sum(times[: warm + 1]) - STEPS * sum(per_length.values()) - per_length[lengths[0]]
    return LMCosts(
        step=per_length,
        compile=max(0.0, first_pass - event),
        event=event,
        setup=max(0.0, wall - sum(times)),
        seconds=wall,
    )


def lm_seconds(lm: LMTrainConfig, costs: LMCosts) -> tuple[float, float]:
    """Seconds of ``lm``'s run on the calibrated machine: (the part that scales with the step
    counts, the part that does not)."""
    variable = 0.0
    for stage in lm.stages:
        weights = stage.weights or (1.0,) * len(stage.lengths)
        mean = sum(w * costs.step[t] for w, t in zip(weights, stage.lengths, strict=True))
        variable += stage.steps * mean / sum(weights)
    n_events = events(lm.total_steps, lm.eval_every, lm.checkpoint_every)
    return variable, costs.setup + costs.compile + n_events * costs.event


def scale_lm(lm: LMTrainConfig, share: float) -> LMTrainConfig:
    """``lm`` with every stage's steps, the warm-up and the event intervals times ``share``
    (each stage keeps at least one step). ``share`` = 1 returns ``lm`` itself."""
    if share >= 1.0:
        return lm
    staged = scale_stages(lm, scaled(lm.total_steps, share, least=len(lm.stages)))
    return dataclasses.replace(
        staged,
        optim=_warmup(lm.optim, share),
        eval_every=scaled(lm.eval_every, share),
        checkpoint_every=scaled(lm.checkpoint_every, share),
    )


def rest_lm(lm: LMTrainConfig, done: int, share: float) -> LMTrainConfig:
    """``lm`` with its steps after ``done`` times ``share``: the stages that ended stay, the
    one under way and those to come scale their steps still to run (each keeps one at least),
    the learning rate goes on from step ``done`` at the new pace; the event intervals stay."""
    if share == 1.0:
        return lm
    ends: list[int] = []
    for end in itertools.accumulate(stage.steps for stage in lm.stages):
        ends.append(max(_later(end, done, share), ends[-1] + 1 if ends else 1))
    stages = tuple(
        dataclasses.replace(stage, steps=end - start)
        for stage, start, end in zip(lm.stages, [0, *ends[:-1]], ends, strict=True)
    )
    now = sum(stage.steps for stage in stages)
    optim = _rescaled(lm.optim, done, lm.total_steps, now)
    return dataclasses.replace(lm, stages=stages, optim=optim)


def config_sha256(cfg: Any) -> str:
    """The hash of a config's JSON: whether a stored calibration or factor was fitted to it."""
    return hashlib.sha256(config_json(cfg).encode()).hexdigest()


def fit(
    minutes_at: Callable[[float], float],
    minutes: float,
    what: str,
    *,
    high: float = 1.0,
) -> float:
    """The largest share of the configured step counts, at most ``high``, whose projected
    minutes (``minutes_at(share)``, calibration included) fit in ``AIM`` of ``minutes``.

    Found by bisection on the projection itself, so that the rounded step counts and intervals
    (which change how often evaluations and checkpoints coincide) are the ones projected.
    Raises ValueError when not even ``MIN_FACTOR`` fits."""
    aim = AIM * minutes
    if minutes_at(high) <= aim:
        return high
    low = MIN_FACTOR
    least = minutes_at(low)
    if least > aim:
        need = least / AIM
        raise ValueError(
            f"minutes={minutes:g} is too short for {what} on this machine: its configured "
            f"steps would take {minutes_at(high):.1f} min, and even {MIN_FACTOR:.0%} of them "
            f"{least:.1f} min; give --minutes {math.ceil(need)} or more, or --minutes 0 to run "
            "every configured step"
        )
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if minutes_at(middle) <= aim else (low, middle)
    return low


@dataclass(frozen=True, kw_only=True)
class RunKind(Generic[Run]):
    """How a budget times, projects and scales one kind of training run."""

    what: str
    """The run in messages: "this tokenizer run"."""
    calibrate: Callable[[Run, Path], Any]
    """Costs of a config, from a short run in a scratch directory (a ``seconds`` and a
    ``setup`` field among them)."""
    costs_from: Callable[[dict], Any]
    """Costs read back from their JSON record."""
    seconds: Callable[[Run, Any], tuple[float, float]]
    """A config's projected seconds: (the part that scales with the steps, the rest)."""
    scale: Callable[[Run, float], Run]
    """A config with its step counts times a share."""
    steps: Callable[[Run], int]
    """A config's steps."""
    starts: Callable[[Run], tuple[int, ...]]
    """The steps a config's phases start at: a re-fit may not move a started phase's start past
    the steps taken (a quantizer turned off again)."""
    step_cost: Callable[[Any, Any], float]
    """The calibrated seconds of one step, given what the loop says of it (``Refit.observe``)."""
    slower: Callable[[Any, float], Any]
    """Costs with every part a step or an event costs times a ratio."""
    key: Callable[[Any], Hashable]
    """The kind of a step, from what the loop says of it: each kind is timed against its
    calibrated cost apart."""
    measured: Callable[[Any, dict[Hashable, float], float], Any]
    """Costs with each kind of step's times its own measured ratio (keyed by ``key``), the
    kinds not measured and the events times the last argument."""
    rest: Callable[[Run, int, float], Run]
    """A config with its steps after a step, and its phases still to start, times a share."""


def run_minutes(kind: RunKind[Run], run: Run, costs: Any) -> float:
    """Minutes of the run ``run``, calibration included, at ``costs``."""
    variable, fixed = kind.seconds(run, costs)
    return (costs.seconds + variable + fixed) / 60


def projected_minutes(kind: RunKind[Run], base: Run, share: float, costs: Any) -> float:
    """Minutes of the run ``base`` scaled by ``share``, calibration included, at ``costs``."""
    return run_minutes(kind, kind.scale(base, share), costs)


def _times(value: float | None, ratio: float) -> float | None:
    return None if value is None else value * ratio


def _tokenizer_measured(costs: TokenizerCosts, ratios: dict, other: float) -> TokenizerCosts:
    return dataclasses.replace(
        costs,
        step=costs.step * ratios.get((True, False), other),
        gan_step=costs.gan_step * ratios.get((True, True), other),
        event=costs.event * other,
        continuous_step=_times(costs.continuous_step, ratios.get((False, False), other)),
        evaluation=_times(costs.evaluation, other),
        preview=_times(costs.preview, other),
        checkpoint=_times(costs.checkpoint, other),
    )


def _lm_measured(costs: LMCosts, ratios: dict, other: float) -> LMCosts:
    def ratio(t: int) -> float:  # a length's own steps', else those of steps it was among
        among = (r for key, r in ratios.items() if t in key)
        return ratios.get((t,), next(among, other))

    step = {t: s * ratio(t) for t, s in costs.step.items()}
    return dataclasses.replace(costs, step=step, event=costs.event * other)


TOKENIZER: RunKind[TokenizerTrainConfig] = RunKind(
    what="this tokenizer run",
    # through the module's names, which tests replace
    calibrate=lambda base, scratch: calibrate_tokenizer(base, scratch, gan=has_gan_phase(base)),
    costs_from=lambda record: TokenizerCosts(**record),
    seconds=lambda run, costs: tokenizer_seconds(run, costs),
    scale=lambda run, share: scale_tokenizer(run, share),
    steps=lambda run: run.steps,
    # a GAN phase switched off by its weight never starts
    starts=lambda run: (
        run.continuous_steps,
        run.loss.disc_start_step if run.loss.gan_weight else NEVER,
    ),
    step_cost=lambda costs, about: (
        costs.warm_start_step if not about[0] else costs.gan_step if about[1] else costs.step
    ),
    slower=lambda costs, ratio: _tokenizer_measured(costs, {}, ratio),
    key=lambda about: (bool(about[0]), bool(about[0] and about[1])),
    measured=_tokenizer_measured,
    rest=lambda run, done, share: rest_tokenizer(run, done, share),
)
"""A tokenizer run; its loop tells ``Refit.observe`` whether a step was quantized and whether it
had the GAN on."""

LM: RunKind[LMTrainConfig] = RunKind(
    what="this language-model run",
    calibrate=lambda base, scratch: calibrate_lm(base, scratch),
    costs_from=LMCosts.from_record,
    seconds=lambda run, costs: lm_seconds(run, costs),
    scale=lambda run, share: scale_lm(run, share),
    steps=lambda run: run.total_steps,
    starts=lambda run: tuple(itertools.accumulate(stage.steps for stage in run.stages))[:-1],
    step_cost=lambda costs, lengths: statistics.mean(costs.step[t] for t in lengths),
    slower=lambda costs, ratio: _lm_measured(costs, {}, ratio),
    key=lambda lengths: tuple(sorted(set(lengths))),
    measured=_lm_measured,
    rest=lambda run, done, share: rest_lm(run, done, share),
)
"""A language-model run; its loop tells ``Refit.observe`` the latent length of each of a step's
micro-batches."""


def fit_run(cfg: Run, out: Path, kind: RunKind[Run], *, world_size: int = 1) -> Run:
    """The training config ``cfg`` (with ``budget_minutes`` and ``max_minutes``) fitted to its
    budget on this machine, for a run in ``out`` (``cfg`` itself when it has none and ``out``
    no budget.json; refused under torchrun, ``world_size`` > 1), timed, projected and scaled as
    ``kind`` says.

    A new run is calibrated in ``out/calibration`` (emptied first, removed after) and its factor
    recorded in ``out/budget.json``; a resumed run keeps the recorded factor and budget, with
    or without ``budget_minutes`` this time; a run started without a budget keeps its steps
    and stops at ``budget_minutes``. A budget refused as too short keeps its calibration for
    the next try of the same config. ``max_minutes`` becomes the budget less the calibration
    and the run's own set-up (or stays, when smaller): the training loop stops there, so an
    invocation ends within the budget give or take a step, however slow its steps turn out to
    be (a resumed one gets that time again)."""
    if world_size > 1 and cfg.budget_minutes > 0:
        raise ValueError(
            "--minutes (budget_minutes) fits a single-process run to this machine's speed; "
            "under torchrun give --steps and --set max_minutes=M to stop at M minutes"
        )
    base = dataclasses.replace(cfg, budget_minutes=0.0, max_minutes=0.0)
    out.mkdir(parents=True, exist_ok=True)
    path = out / BUDGET_FILE
    record = json.loads(path.read_text()) if path.is_file() else {}
    if not cfg.budget_minutes and "factor" not in record:
        return cfg
    configured = config_sha256(base)
    if "factor" in record:
        log.info("budget: the factor %.3f, from this run's calibration", record["factor"])
        if cfg.budget_minutes and record["minutes"] != cfg.budget_minutes:
            log.warning(
                "budget: this run started with a budget of %g min and keeps it, and its factor; "
                "--minutes %g applies to a new --out",
                record["minutes"],
                cfg.budget_minutes,
            )
        if record.get("config") != configured:
            log.warning(
                "budget: the config changed since this run's budget was fitted; its factor "
                "%.3f scales the new step counts, unprojected (a new --out fits them anew)",
                record["factor"],
            )
    elif any((out / "checkpoints").glob("*")):
        log.warning(
            "budget: this run started without a time budget, so its steps stay as configured "
            "and it only stops at %g min; --minutes fits the steps of a new --out",
            cfg.budget_minutes,
        )
        stop = min(cfg.budget_minutes, cfg.max_minutes or math.inf)
        return dataclasses.replace(cfg, max_minutes=stop)
    else:
        if record.get("config") == configured:  # refused as too short: the same machine
            costs = kind.costs_from(record["calibration"])
        else:
            log.info("budget: timing a few steps, to fit %g min", cfg.budget_minutes)
            shutil.rmtree(out / "calibration", ignore_errors=True)  # a killed try's
            try:
                costs = kind.calibrate(base, out / "calibration")
            finally:
                shutil.rmtree(out / "calibration", ignore_errors=True)
            record = {"config": configured, "calibration": dataclasses.asdict(costs)}
            atomic_write_text(path, json.dumps(record, indent=2) + "\n")
        record = _fit_and_record(kind, base, costs, cfg.budget_minutes, record, path)
    spent = record["calibration"]["seconds"] + record["calibration"]["setup"]
    stop = min(record["minutes"] - spent / 60, cfg.max_minutes or math.inf)
    fitted = kind.scale(base, record["factor"])
    if "calibrated_factor" in record:  # re-fitted early: the warm-up stays the calibrated one
        fitted = _same_warmup(fitted, kind.scale(base, record["calibrated_factor"]))
    for later in record.get("rest", []):  # the re-fits from later kinds of step
        fitted = kind.rest(fitted, later["step"], later["share"])
    return dataclasses.replace(fitted, budget_minutes=record["minutes"], max_minutes=stop)


def _fit_and_record(
    kind: RunKind[Run], base: Run, costs: Any, minutes: float, record: dict, path: Path
) -> dict:
    """Fit the factor of the run ``base`` to ``minutes`` at ``costs``, and write it with
    ``record`` (the config's hash and the calibration) to ``path``; returns what it wrote."""

    def minutes_at(share: float) -> float:
        return projected_minutes(kind, base, share, costs)

    share = fit(minutes_at, minutes, kind.what)
    record = {
        "minutes": minutes,
        "factor": share,
        "projected_min": round(minutes_at(1.0), 1),
        "fitted_min": round(minutes_at(share), 1),
        **record,
    }
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    if share < 1:
        log.warning(
            "budget: the configured %d steps would take %.1f min here (projected), over the "
            "budget of %g: every step count is scaled by %.2f, to %d steps (projected %.1f "
            "min); --minutes 0 runs them all in a new --out",
            kind.steps(base),
            record["projected_min"],
            minutes,
            share,
            kind.steps(kind.scale(base, share)),
            record["fitted_min"],
        )
    else:
        log.info(
            "budget: projected %.1f min, within the budget of %g", record["projected_min"], minutes
        )
    return record


def budget_from_costs(
    cfg: Run, out: Path, kind: RunKind[Run], costs: Any, minutes: float
) -> Run | None:
    """The run ``cfg`` in ``out`` given a budget of ``minutes`` from costs timed elsewhere
    (``loong recipe shapes`` times all its phases before the first): its factor fitted and
    recorded in ``out/budget.json`` as :func:`fit_run` would, without a calibration of its own.
    Returns ``cfg`` with that ``budget_minutes``, which then trains as a budgeted run: it keeps
    the factor, stops at the budget and re-fits from its own steps (:class:`Refit`).

    A run with a budget.json keeps it (a resumed one); a run that started without one (it has
    checkpoints) gets none: None. ``costs.seconds`` is the time the calibration took from this
    budget (0 when it was spent before it). Raises ValueError when not even ``MIN_FACTOR`` of
    the steps fits."""
    path = out / BUDGET_FILE
    if path.is_file():
        return dataclasses.replace(cfg, budget_minutes=json.loads(path.read_text())["minutes"])
    if any((out / "checkpoints").glob("*")):
        return None
    base = dataclasses.replace(cfg, budget_minutes=0.0, max_minutes=0.0)
    record = {"config": config_sha256(base), "calibration": dataclasses.asdict(costs)}
    out.mkdir(parents=True, exist_ok=True)
    _fit_and_record(kind, base, costs, minutes, record, path)
    return dataclasses.replace(cfg, budget_minutes=minutes)


class Refit(Generic[Run]):
    """A budgeted run's factor fitted once more from the run's own step times, and the rest of
    the run again from each later kind of step's (see the module's docstring).

    The loop calls :meth:`observe` after each step with the steps done, the step's seconds (its
    events left out), what ``kind.key`` and ``kind.step_cost`` need to know of it and the
    seconds since the loop began; once ``due`` steps of a kind are timed, or a late check finds
    the run slower or faster than fitted or its clock behind or ahead of its pace
    (:meth:`_late`), it gets back the re-fitted config, or None while there is none to switch
    to, and checkpoints the step (a resumed run takes the re-fitted config from ``budget.json``,
    so an earlier checkpoint could resume a phase the re-fit moved past it). Inactive
    (``observe`` always None) for a run without a recorded factor, a resumed run, a re-fitted
    one, one whose config changed since its fit, and under torchrun (``world_size`` > 1); a run
    too short to re-fit early in it (``REFIT_MIN_STEPS``) keeps its factor unless its steps run
    fast enough to re-fit it to a run long enough.
    """

    def __init__(
        self,
        configured: Run,
        fitted: Run,
        out: Path,
        kind: RunKind[Run],
        *,
        resumed: bool,
        world_size: int = 1,
    ) -> None:
        self.path, self.kind, self.fitted = out / BUDGET_FILE, kind, fitted
        self.base = dataclasses.replace(configured, budget_minutes=0.0, max_minutes=0.0)
        self.record = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.due = REFIT_SKIP + max(REFIT_MIN_STEPS, math.ceil(REFIT_SHARE * kind.steps(fitted)))
        self.active = (
            world_size == 1  # ranks would time their steps apart
            and not resumed
            and "factor" in self.record
            and "refit" not in self.record
            and self.record.get("config") == config_sha256(self.base)
        )
        self.samples: dict[Hashable, list[float]] = {}
        """Each kind's steps' seconds over their calibrated cost, until the kind is timed."""
        self.timed: dict[Hashable, float] = {}
        """Each timed kind's median ratio, in the order they were timed."""
        self.planned = 1.0
        """The ratio the run's current steps were fitted with for the kinds not timed."""
        self.fitted_at: dict[Hashable, float] = {}
        """The ratio the run's current steps were fitted with for each kind, where not
        ``planned``: what a late check compares a kind's steps with."""
        self.costs = kind.costs_from(self.record["calibration"]) if self.active else None
        self.recent: deque[float] = deque(maxlen=self.due - REFIT_SKIP)
        """The last steps' seconds over the seconds their kind was fitted at, once timed."""
        self.unchecked = 0
        """Steps timed into ``recent`` since the last late check."""
        self.unchecked_time = 0.0
        """Their seconds, in steps at the speed fitted (the sum of their entries in ``recent``)."""
        self.marks: deque[tuple[int, float]] = deque(maxlen=CLOCK_WINDOWS + 1)
        """(steps done, loop seconds) at the late checks since the steps' speed was last
        fitted, and at the first late step after it: the clock's pace is measured from the
        oldest."""
        self.pace = 1.0
        """The clock's pace (the loop's seconds over those the run was fitted to spend, events
        and stalls included) the steps still to come were last fitted at: 1 but after a
        re-fit from the clock."""

    def observe(
        self, done: int, seconds: float, about: Any, elapsed: float | None = None
    ) -> Run | None:
        """Record the ``seconds`` of the step that made ``done`` steps; at the ``due``-th step
        of a kind, the re-fitted config if it differs; later, at each late check (:meth:`_late`),
        the config re-fitted to the time left when the run is slower or faster than fitted, or
        its clock says the rest will not fit (``elapsed``: the loop's seconds so far, what its
        ``max_minutes`` stop counts; None: no late checks)."""
        if not self.active:
            return None
        key = self.kind.key(about)
        cost = self.kind.step_cost(self.costs, about)
        if cost <= 0:  # timed at 0 s (elapsed_s is in ms): nothing to compare with
            self.active = False
            return None
        if key in self.timed:
            return self._late(done, key, seconds / cost, elapsed)
        samples = self.samples.setdefault(key, [])
        samples.append(seconds / cost)
        if len(samples) < self.due:
            return None
        self.timed[key] = ratio = statistics.median(self.samples.pop(key)[REFIT_SKIP:])
        if len(self.timed) == 1:
            new = self._refit(done, ratio)
        else:
            new = self._refit_rest(done, key, ratio)
        if new is None:
            return None
        self.fitted = new
        return new

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.record, indent=2) + "\n")

    def _refit(self, done: int, ratio: float) -> Run | None:
        """The first kind timed: every step count scaled by a factor fitted again."""
        costs = self.costs
        was = self.record["factor"]
        share = was
        if abs(ratio - 1) > REFIT_TOLERANCE:
            slower = self.kind.slower(costs, ratio)

            def minutes_at(share: float) -> float:
                return projected_minutes(self.kind, self.base, share, slower)

            try:
                share = fit(minutes_at, self.record["minutes"], self.kind.what)
            except ValueError:  # not even the least share fits: the stop at the budget ends it
                share = MIN_FACTOR
            least = (done + 1) / self.kind.steps(self.base)  # never fewer steps than taken
            share = max(share, min(1.0, least))
            steps = self.kind.steps(self.kind.scale(self.base, share))
            longer = max(steps, self.kind.steps(self.fitted))
            if done > 2 * REFIT_SHARE * longer:  # too late in the run it is and would be
                log.info(
                    "budget: a re-fit to the factor %.3f (%d steps) would come after %d of "
                    "them, too late: the factor %.3f stays",
                    share,
                    steps,
                    done,
                    was,
                )
                share = was
            before = self.kind.starts(self.fitted)
            after = self.kind.starts(self.kind.scale(self.base, share))
            # a phase some steps ran in may not start after the next step (``done``)
            if any(a < done < b for a, b in zip(before, after, strict=True)):
                log.warning(
                    "budget: a re-fit to the factor %.3f would restart a phase begun by step %d "
                    "(starts %s, now %s): the factor %.3f stays",
                    share,
                    done,
                    before,
                    after,
                    was,
                )
                share = was
        refit = {"step": done, "step_ratio": round(ratio, 3), "factor": share}
        self.record |= {"factor": share, "calibrated_factor": was, "refit": refit}
        self._write()
        if share == was:
            log.info(
                "budget: the first %d steps took %.2f× the calibrated time: the factor %.3f stays",
                done,
                ratio,
                was,
            )
            return None
        self.planned, self.fitted_at, self.pace = ratio, {}, 1.0
        self.marks.clear()
        new = _same_warmup(self.kind.scale(self.base, share), self.fitted)
        log.warning(
            "budget: the first %d steps took %.2f× the calibrated time: the factor is re-fitted "
            "from %.3f to %.3f, %d steps instead of %d",
            done,
            ratio,
            was,
            share,
            self.kind.steps(new),
            self.kind.steps(self.fitted),
        )
        return dataclasses.replace(
            new, budget_minutes=self.fitted.budget_minutes, max_minutes=self.fitted.max_minutes
        )

    def _at_speed(self, speed: float) -> Any:
        """The costs of every kind at ``speed`` times the speed the run is fitted at."""
        fitted_at = {k: self.fitted_at.get(k, self.planned) * speed for k in self.timed}
        return self.kind.measured(self.costs, fitted_at, self.planned * speed)

    def _late(self, done: int, key: Hashable, ratio: float, elapsed: float | None) -> Run | None:
        """A timed kind's step: each time ``recent`` is filled anew (or sooner, once the steps since
        the last check took as long as two windows at the speed fitted), the steps after ``done``
        fitted into the time left before the stop, at most the configured steps, when those steps
        ran more than ``LATE_TOLERANCE`` slower or faster than their kinds were fitted at (every
        kind, and the events, as much; ``"late"`` in ``budget.json``), or else at the pace of the
        run's clock over its last ``CLOCK_WINDOWS`` windows (stalls and events included, which a
        window's median leaves out) when they would overrun the time left at it, or when it is more
        than ``AHEAD_TOLERANCE`` faster than the pace they were last fitted at (``"clock"``)."""
        self.recent.append(ratio / self.fitted_at.get(key, self.planned))
        self.unchecked += 1
        self.unchecked_time += self.recent[-1]
        was, window = self.fitted, self.recent.maxlen or 1
        if elapsed is not None and not self.marks:
            self.marks.append((done, elapsed))
        # a window's steps, or fewer that took as long as two windows at the speed fitted
        due = self.unchecked >= window or (self.unchecked >= 3 and self.unchecked_time > 2 * window)
        if (
            elapsed is None
            or was.max_minutes <= 0
            or not due
            or self.kind.steps(was) - done <= window  # the end is near: the stop's margin
        ):
            return None
        latest = list(self.recent)[-self.unchecked :]  # the steps since the last check
        self.unchecked, self.unchecked_time = 0, 0.0
        now = statistics.median(latest)  # times the speed the run was fitted at
        steps = self.kind.steps(was)

        def minutes_to(step: int, measured: Any) -> float:  # the run cut after ``step``
            return run_minutes(self.kind, self.kind.rest(was, step, 0.0), measured)

        def minutes_after(share: float, measured: Any) -> float:  # the steps after ``done``
            after = run_minutes(self.kind, self.kind.rest(was, done, share), measured)
            return after - minutes_to(done, measured)

        def left_at(measured: Any) -> float:
            # the time left, less one more event's worth (the stop already leaves out the
            # set-up, the last evaluation and the export among it, at their calibrated cost)
            return was.max_minutes - elapsed / 60 - measured.event / 60

        speed = now
        why = f"the last {len(latest)} steps took {now:.2f}× the time the run was fitted at"
        moved = abs(now - 1) > LATE_TOLERANCE
        if not moved:  # the steps run as fitted: does the clock?
            self.marks.append((done, elapsed))
            start, began = self.marks[0]
            at_fitted = self._at_speed(1.0)
            planned = minutes_to(done, at_fitted) - minutes_to(start, at_fitted)
            pace = (elapsed - began) / 60 / planned if planned > 0 else self.pace
            at_pace = self._at_speed(max(pace, self.pace))
            spent = minutes_after(1.0, at_pace) > left_at(at_pace)  # the margin, at that pace
            ahead = pace < (1 - AHEAD_TOLERANCE) * self.pace  # stalls gone, a faster machine
            if not spent and not (ahead and steps < self.kind.steps(self.base)):
                return None
            speed = max(pace, self.pace) if spent else pace
            why = (
                f"the {done - start} steps since step {start} took {pace:.2f}× the time the run "
                f"was fitted at on its clock (stalls and events included; {now:.2f}× the median)"
            )
        measured = self._at_speed(speed)
        most = (self.kind.steps(self.base) - done) / (steps - done)  # the configured steps
        left = left_at(measured)
        try:
            share = fit(
                lambda share: minutes_after(share, measured),
                max(left, 0.0),
                self.kind.what,
                high=most,
            )
        except ValueError:  # not even the least share fits: the stop at the budget ends it
            share = MIN_FACTOR
        self.recent.clear()
        self.pace = 1.0 if moved else speed
        if moved:  # the steps' own speed: the run is fitted at it from here
            self.marks.clear()
            self.timed = {k: r * now for k, r in self.timed.items()}
            self.fitted_at = {k: self.fitted_at.get(k, self.planned) * now for k in self.timed}
            self.planned *= now
        self.fitted = new = self.kind.rest(was, done, share)
        entry = {"step": done, "kind": "late" if moved else "clock", "step_ratio": round(speed, 3)}
        entry["share"] = share
        self.record.setdefault("rest", []).append(entry)
        self._write()
        if new == was:
            return None
        log.warning(
            "budget: %s: the steps after %d are re-fitted by %.3f into the %.1f min left, %d "
            "steps instead of %d",
            why,
            done,
            share,
            left,
            self.kind.steps(new),
            steps,
        )
        return new

    def _refit_rest(self, done: int, key: Hashable, ratio: float) -> Run | None:
        """A later kind timed: the steps after ``done`` scaled by a share fitted at each timed
        kind's own speed (the kinds still to come at this one's), when this kind's ratio is
        more than ``REFIT_TOLERANCE`` off the one the run was fitted with."""
        was = self.fitted
        steps = self.kind.steps(was)
        share = 1.0
        if abs(ratio / self.planned - 1) > REFIT_TOLERANCE and done < steps:
            measured = self.kind.measured(self.costs, self.timed, ratio)

            def minutes_at(share: float) -> float:
                return run_minutes(self.kind, self.kind.rest(was, done, share), measured)

            most = (self.kind.steps(self.base) - done) / (steps - done)  # the configured steps
            try:
                share = fit(minutes_at, self.record["minutes"], self.kind.what, high=most)
            except ValueError:  # not even the least share fits: the stop at the budget ends it
                share = MIN_FACTOR
        new = self.kind.rest(was, done, share)
        entry = {"step": done, "kind": repr(key), "step_ratio": round(ratio, 3), "share": share}
        self.record.setdefault("rest", []).append(entry)
        self._write()
        if new == was:
            log.info(
                "budget: steps of the kind %r took %.2f× the calibrated time: the steps stay",
                key,
                ratio,
            )
            return None
        log.warning(
            "budget: steps of the kind %r took %.2f× the calibrated time (the run was fitted "
            "at %.2f×): the steps after %d are re-fitted by %.3f, %d steps instead of %d",
            key,
            ratio,
            self.planned,
            done,
            share,
            self.kind.steps(new),
            steps,
        )
        self.planned, self.fitted_at, self.pace = ratio, dict(self.timed), 1.0
        self.marks.clear()
        return new


def fit_tokenizer(
    cfg: TokenizerTrainConfig, out: Path, world_size: int = 1
) -> TokenizerTrainConfig:
    """The tokenizer run ``cfg`` fitted to ``cfg.budget_minutes`` (:func:`fit_run`)."""
    return fit_run(cfg, out, TOKENIZER, world_size=world_size)


def fit_lm(cfg: LMTrainConfig, out: Path, world_size: int = 1) -> LMTrainConfig:
    """The language-model run ``cfg`` fitted to ``cfg.budget_minutes`` (:func:`fit_run`)."""
    return fit_run(cfg, out, LM, world_size=world_size)
