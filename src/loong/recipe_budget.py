"""Fit ``loong recipe shapes`` into a wall-time budget.

The recipe's step counts were set on a 2-core CPU with native bf16, where the whole recipe takes
about an hour; on a 2-core CPU without it the same steps take about 2.8 hours (BENCHMARKS.md).
With a budget (``ShapesRecipeConfig.minutes``, 90 by default) the recipe first times a few real
steps of every phase on this machine (:func:`calibrate`: the training loops themselves, in a
scratch directory), projects the whole run from them (:func:`project`), and when the projection
is over the budget scales every count that buys time by one factor (:func:`scale`):

- tokenizer: its steps and the steps its phases start at (continuous latent, GAN), the long-clip
  run's steps;
- shards: the training clips (the LM then sees each clip as often as before);
- language model: every stage's steps, in proportion.

What stays: learning rates and warm-ups, evaluations and checkpoints (their intervals scale, so
there are as many), the held-out clips. The factor is never above 1: a machine fast enough runs
the configured recipe unchanged. A scaled recipe trains a weaker model: the budget buys a
finished bundle on time, not the bundle's quality (BENCHMARKS.md, "The recipe in 90 minutes on
a CPU without AVX-512"). The factor follows the speed measured, which on a shared machine moves
from one minute to the next (0.38–0.45 in four calibrations on one CPU), so two budgeted runs
may train different step counts; ``minutes = 0`` runs the configured recipe, the same on every
run of one machine, and a resumed run keeps the factor it started with.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loong.data.shards import tokenize_dataset
from loong.train.lm import train_lm
from loong.train.lm_config import StageConfig, scale_stages
from loong.train.tokenizer import train_tokenizer
from loong.train.tokenizer_config import TokenizerTrainConfig
from loong.video_tokenizer.model import VideoTokenizer

if TYPE_CHECKING:
    from loong.recipe import ShapesRecipeConfig

STEPS = 5
"""Timed steps of each kind: the first of each is left out (allocation, compilation). The
calibration runs' event intervals assume at least 2."""
CLIPS = (4, 4, 44)
"""Shard sizes tokenized: the first pays the warm-up and is not used; the time a clip is the
slope between the other two, and the set-up their intercept. The largest holds more than the
LM evaluation's 32 items of every length t > 1 (t = 1 items come from the stills, about 4)."""
MIN_FACTOR = 0.05
"""Below this share of the configured steps the recipe trains nothing worth bundling."""
AIM = 0.92
"""The share of the budget the projection is fitted to: step times vary by a few percent from
the calibration's (the first budgeted recipe measured ran 3.7% over its projection)."""
NEVER = 10**9
"""An interval no calibration run reaches."""


@dataclass(kw_only=True)
class Costs:
    """Seconds of each unit of work of the recipe on this machine."""

    tokenizer_step: float
    """One tokenizer training step on the tokenizer's clips (quantized, no GAN)."""
    tokenizer_gan_step: float
    """One with the GAN on (the discriminator's update included)."""
    tokenizer_event: float
    """An evaluation with a preview and a checkpoint, on top of its step."""
    tokenizer_setup: float
    """A tokenizer run's start, first step's warm-up, last evaluation and export."""
    clip: float
    """Tokenizing one shard clip."""
    shards_setup: float
    """A shards directory's set-up (model load, BPE), on top of its clips."""
    lm_step: dict[int, float]
    """One LM step by latent length t."""
    lm_compile: float
    """The LM steps' first-call overhead (compilation), all lengths."""
    lm_event: float
    """An LM evaluation with a checkpoint, on top of its step."""
    lm_setup: float
    """The LM run's start (data, model), last evaluation and export."""
    seconds: float = 0.0
    """Wall time the calibration took (spent from the budget)."""

    @classmethod
    def from_record(cls, record: dict) -> Costs:
        """Costs from their ``dataclasses.asdict`` as JSON stored them (lengths as strings)."""
        return cls(**(record | {"lm_step": {int(t): s for t, s in record["lm_step"].items()}}))


def _step_times(metrics: Path) -> list[float]:
    """Each step's seconds from a run's metrics.jsonl (``elapsed_s`` of every step)."""
    elapsed = [json.loads(line)["elapsed_s"] for line in metrics.read_text().splitlines()]
    return [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]


def _calibrate_tokenizer(
    tok: TokenizerTrainConfig, scratch: Path, *, gan: bool
) -> tuple[float, float, float, float]:
    """(step, GAN step, event, set-up) seconds of the tokenizer run ``tok`` (its GAN steps
    timed when ``gan``); exports ``scratch/export``."""
    started = time.monotonic()
    n = 2 * STEPS + 1  # plain steps; the event after step n - 1, so step n waits for it
    run = dataclasses.replace(
        tok,
        steps=n + (STEPS + 1 if gan else 0),  # then GAN steps, the first a warm-up
        continuous_steps=0,
        loss=dataclasses.replace(tok.loss, disc_start_step=n if gan else NEVER),
        eval_every=n - 1,
        preview_every=n - 1,
        checkpoint_every=n - 1,
        log_every=1,
        max_minutes=0.0,
    )
    times = _step_times(train_tokenizer(run, scratch, progress=False).parent / "metrics.jsonl")
    wall = time.monotonic() - started
    step = statistics.median(times[1 : n - 1])
    event = max(0.0, times[n - 1] - step)
    gan_step = statistics.median(times[n + 1 :]) if gan else step
    setup = wall - sum(times) + max(0.0, times[0] - step)
    return step, gan_step, event, max(0.0, setup)


def _calibrate_clips(
    cfg: ShapesRecipeConfig, tokenizer: Path, scratch: Path
) -> tuple[float, float, Path]:
    """(seconds a shard clip, seconds of a shards directory's set-up, the largest made)."""
    walls = []
    for i, n in enumerate(CLIPS):
        started = time.monotonic()
        shards = dataclasses.replace(cfg.shards, n_clips=n, video_tokenizer=str(tokenizer))
        out = tokenize_dataset(shards, scratch / f"shards_{i}", progress=False)
        walls.append(time.monotonic() - started)
    clip = max(0.0, (walls[2] - walls[1]) / (CLIPS[2] - CLIPS[1]))
    return clip, max(0.0, walls[1] - CLIPS[1] * clip), out


def _calibrate_lm(cfg: ShapesRecipeConfig, shards: Path, scratch: Path):
    """({t: step seconds}, compile, event, set-up seconds) of the recipe's LM.

    Two passes over the stages' latent lengths, ``STEPS`` steps each, with an evaluation and a
    checkpoint at the end of each pass: the first pass compiles (the blocks for each new shape
    until they go dynamic, the evaluation's forward), the second is timed."""
    lengths = sorted({t for stage in cfg.lm.stages for t in stage.lengths})
    stages = [StageConfig(name=f"calibration t={t}", steps=STEPS, lengths=(t,)) for t in lengths]
    stages *= 2
    stages[-1] = dataclasses.replace(stages[-1], steps=STEPS + 1)  # its last step waits
    warm = STEPS * len(lengths)
    lm = cfg.lm
    run = dataclasses.replace(
        lm,
        stages=tuple(stages),
        data=dataclasses.replace(lm.data, shards=(str(shards),), eval_shards=""),
        eval_every=warm,  # after each pass
        checkpoint_every=warm,
        log_every=1,
        max_minutes=0.0,
        tensorboard=False,
    )
    started = time.monotonic()
    times = _step_times(train_lm(run, scratch, progress=False).parent / "metrics.jsonl")
    setup = max(0.0, time.monotonic() - started - sum(times))
    per_length = {}
    for i, t in enumerate(lengths):
        start = warm + i * STEPS
        per_length[t] = statistics.median(times[start + 1 : start + STEPS])  # not the first
    event = max(0.0, times[-1] - per_length[lengths[-1]])
    first_pass = sum(times[: warm + 1]) - STEPS * sum(per_length.values()) - per_length[lengths[0]]
    return per_length, max(0.0, first_pass - event), event, setup


def calibrate(cfg: ShapesRecipeConfig, scratch: str | Path) -> Costs:
    """Time a few steps of each of the recipe's phases on this machine, in ``scratch``
    (removed after): the tokenizer's training loop (skipped with ``tokenizer_from`` unless the
    long-clip run trains it), the shards' tokenizing, the LM's training loop on every latent
    length its stages use."""
    scratch = Path(scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.monotonic()
    tok, tokenizer = cfg.tokenizer, scratch / "tokenizer" / "export"
    if cfg.tokenizer_from:  # not trained: timed only for the long-clip run, on its weights
        tokenizer = Path(cfg.tokenizer_from)
        model = VideoTokenizer.from_pretrained(tokenizer).config
        tok = dataclasses.replace(tok, model=model, init_from=str(tokenizer))
    step = gan_step = event = setup = 0.0
    if not cfg.tokenizer_from or cfg.tokenizer_long.steps:
        # the long-clip run has no GAN phase
        gan = not cfg.tokenizer_from and tok.loss.gan_weight > 0
        gan = gan and tok.loss.disc_start_step < tok.steps
        step, gan_step, event, setup = _calibrate_tokenizer(tok, scratch / "tokenizer", gan=gan)
    clip, shards_setup, shards = _calibrate_clips(cfg, tokenizer, scratch)
    lm_step, lm_compile, lm_event, lm_setup = _calibrate_lm(cfg, shards, scratch / "lm")
    shutil.rmtree(scratch, ignore_errors=True)
    return Costs(
        tokenizer_step=step,
        tokenizer_gan_step=gan_step,
        tokenizer_event=event,
        tokenizer_setup=setup,
        clip=clip,
        shards_setup=shards_setup,
        lm_step=lm_step,
        lm_compile=lm_compile,
        lm_event=lm_event,
        lm_setup=lm_setup,
        seconds=time.monotonic() - started,
    )


def _events(steps: int, *intervals: int) -> int:
    """Steps 1..steps at which one of the intervals falls, and the last."""
    hits = sum(1 for s in range(1, steps + 1) if any(s % i == 0 for i in intervals))
    return hits + (0 if any(steps % i == 0 for i in intervals) else 1)


def project(cfg: ShapesRecipeConfig, costs: Costs) -> tuple[float, float]:
    """Seconds of ``cfg``'s run on the calibrated machine: (the part that scales with the step
    counts, the part that does not)."""
    tok, variable, fixed = cfg.tokenizer, 0.0, 0.0
    if not cfg.tokenizer_from:
        gan = tok.loss.gan_weight > 0
        n_gan = max(0, tok.steps - tok.loss.disc_start_step) if gan else 0
        variable += (tok.steps - n_gan) * costs.tokenizer_step + n_gan * costs.tokenizer_gan_step
        intervals = (tok.eval_every, tok.preview_every, tok.checkpoint_every)
        fixed += _events(tok.steps, *intervals) * costs.tokenizer_event + costs.tokenizer_setup
    long = cfg.tokenizer_long
    if long.steps:  # clips this many times longer: steps as many times slower
        longer = long.n_frames / tok.data.n_frames
        variable += long.steps * costs.tokenizer_step * longer
        events = _events(long.steps, long.steps, tok.preview_every, tok.checkpoint_every)
        fixed += (events * costs.tokenizer_event + costs.tokenizer_setup) * longer
    variable += cfg.shards.n_clips * costs.clip
    fixed += cfg.eval_clips * costs.clip + (2 if cfg.eval_clips else 1) * costs.shards_setup
    for stage in cfg.lm.stages:
        weights = stage.weights or (1.0,) * len(stage.lengths)
        mean = sum(w * costs.lm_step[t] for w, t in zip(weights, stage.lengths, strict=True))
        variable += stage.steps * mean / sum(weights)
    lm = cfg.lm
    events = _events(lm.total_steps, lm.eval_every, lm.checkpoint_every)
    fixed += costs.lm_setup + costs.lm_compile + events * costs.lm_event
    return variable, fixed


def minutes_of(cfg: ShapesRecipeConfig, costs: Costs) -> float:
    """Projected minutes of ``cfg``'s whole run, the calibration included."""
    variable, fixed = project(cfg, costs)
    return (costs.seconds + fixed + variable) / 60


def factor(cfg: ShapesRecipeConfig, costs: Costs, minutes: float) -> float:
    """The largest share of the configured step counts, at most 1, whose projection fits in
    ``AIM`` of ``minutes``.

    Found by bisection on the projection of the scaled config itself, so that its rounded step
    counts and intervals (which change how often evaluations and checkpoints coincide) are the
    ones projected."""
    aim = AIM * minutes
    if minutes_of(cfg, costs) <= aim:
        return 1.0
    low, high = MIN_FACTOR, 1.0
    least = minutes_of(scale(cfg, low), costs)
    if least > aim:
        need = least / AIM
        raise ValueError(
            f"minutes={minutes:g} is too short for the recipe on this machine: its configured "
            f"steps would take {minutes_of(cfg, costs):.1f} min, and even {MIN_FACTOR:.0%} of "
            f"them {need:.1f} min; give --minutes {math.ceil(need)} or more, or --minutes 0 to "
            "run every configured step"
        )
    for _ in range(30):
        middle = (low + high) / 2
        fits = minutes_of(scale(cfg, middle), costs) <= aim
        low, high = (middle, high) if fits else (low, middle)
    return low


def _scaled(n: int, share: float, least: int = 1) -> int:
    return max(least, round(n * share))


def scale(cfg: ShapesRecipeConfig, share: float) -> ShapesRecipeConfig:
    """``cfg`` with every step count that buys time times ``share`` (see the module docstring);
    ``share`` = 1 returns ``cfg`` itself."""
    if share >= 1.0:
        return cfg
    tok = cfg.tokenizer
    steps = _scaled(tok.steps, share)
    continuous = min(_scaled(tok.continuous_steps, share, least=0), steps - 1)
    disc_start = _scaled(tok.loss.disc_start_step, share, least=0)
    if tok.loss.disc_start_step < tok.steps:  # a GAN phase configured stays
        disc_start = min(disc_start, steps - 1)
    tokenizer = dataclasses.replace(
        tok,
        steps=steps,
        continuous_steps=continuous,
        loss=dataclasses.replace(tok.loss, disc_start_step=disc_start),
        eval_every=_scaled(tok.eval_every, share),
        preview_every=_scaled(tok.preview_every, share),
        checkpoint_every=_scaled(tok.checkpoint_every, share),
    )
    long = cfg.tokenizer_long
    lm = scale_stages(cfg.lm, _scaled(cfg.lm.total_steps, share, least=len(cfg.lm.stages)))
    return dataclasses.replace(
        cfg,
        tokenizer=tokenizer,
        tokenizer_long=dataclasses.replace(
            long, steps=_scaled(long.steps, share) if long.steps else 0
        ),
        shards=dataclasses.replace(cfg.shards, n_clips=_scaled(cfg.shards.n_clips, share)),
        lm=dataclasses.replace(
            lm,
            eval_every=_scaled(lm.eval_every, share),
            checkpoint_every=_scaled(lm.checkpoint_every, share),
        ),
    )
