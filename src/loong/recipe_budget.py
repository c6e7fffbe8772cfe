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

The tokenizer and the language model then train as budgeted runs of their own
(``loong.recipe._own_budget``): their steps are fitted anew, at the calibrated costs, to their
minutes; each stops there and fits its factor once more from its own steps when they run more
than 10% slower or faster than calibrated, and the steps still to come again from each later
kind of step's own (``loong.train.budget.Refit``), and
``OUT/tokenizer/budget.json`` and ``OUT/lm/budget.json`` record the factors. The tokenizer's
minutes are the share of the budget (after the calibration) that it takes of the fitted
projection: a calibration timed in a busy minute projects every phase too long by the same
ratio, so the share still holds and the re-fit fills it. The language model, the last and
longest phase, gets the minutes the phases before it left, so that it takes up what they left
or overran. When the tokenizer's first steps show the calibration off (more than 10% from
their calibrated time), the shards' clips follow them (``loong.recipe._shard_clips``: the
recipe's share over that ratio) and the language model's steps are timed again before it is
fitted (``loong.recipe._budget_lm``: a busy minute slows each latent length by its own ratio).
The long-clip run keeps the recipe's factor.

What stays: the peak learning rates (the warm-ups scale with the steps), evaluations and
checkpoints (their intervals scale, so there are as many), the held-out clips. The factor is
never above 1: a machine fast enough runs the configured recipe unchanged. A scaled recipe
trains a weaker model: the budget buys a finished bundle on time, not the bundle's quality
(BENCHMARKS.md, "The recipe in 90 minutes on a CPU without AVX-512"). The factor follows the
speed measured, which on a shared machine moves from one minute to the next (0.38–0.45 in four
calibrations on one CPU), so two budgeted runs may train different step counts; ``minutes = 0``
runs the configured recipe, the same on every run of one machine, and a resumed run keeps the
factor it started with. The tokenizer's share (its calibration, projection and scaling) and the
bisection are :mod:`loong.train.budget`'s, which ``loong tokenizer train --minutes`` uses alone.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loong.data.shards import tokenize_dataset
from loong.train.budget import (
    LMCosts,
    TokenizerCosts,
    calibrate_lm,
    calibrate_tokenizer,
    fit,
    has_gan_phase,
    lm_seconds,
    scale_lm,
    scale_tokenizer,
    scaled,
    tokenizer_seconds,
)
from loong.video_tokenizer.model import VideoTokenizer

if TYPE_CHECKING:
    from loong.recipe import ShapesRecipeConfig

CLIPS = (4, 4, 44)
"""Shard sizes tokenized: the first pays the warm-up and is not used; the time a clip is the
slope between the other two, and the set-up their intercept. The largest holds more than the
LM evaluation's 32 items of every length t > 1 (t = 1 items come from the stills, about 4)."""


@dataclass(kw_only=True)
class Costs:
    """Seconds of each unit of work of the recipe on this machine."""

    tokenizer_step: float
    """One tokenizer training step on the tokenizer's clips (quantized, no GAN)."""
    tokenizer_continuous_step: float | None = None
    """One before its quantizer starts (``continuous_steps``); None (no such phase, or a record
    from before it was timed): as ``tokenizer_step``."""
    tokenizer_gan_step: float
    """One with the GAN on (the discriminator's update included)."""
    tokenizer_event: float
    """An evaluation with a preview and a checkpoint, on top of its step."""
    tokenizer_setup: float
    """A tokenizer run's start, first step's warm-up, last evaluation and export."""
    tokenizer_evaluation: float | None = None
    """A tokenizer's evaluation alone, on top of its step; None (a record from before each
    event was timed apart): each event at ``tokenizer_event``."""
    tokenizer_preview: float | None = None
    """A tokenizer's preview alone, on top of its step."""
    tokenizer_checkpoint: float | None = None
    """A tokenizer's checkpoint alone, on top of its step."""
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

    def tokenizer(self) -> TokenizerCosts:
        """The tokenizer run's share of the costs."""
        return TokenizerCosts(
            step=self.tokenizer_step,
            gan_step=self.tokenizer_gan_step,
            event=self.tokenizer_event,
            setup=self.tokenizer_setup,
            continuous_step=self.tokenizer_continuous_step,
            evaluation=self.tokenizer_evaluation,
            preview=self.tokenizer_preview,
            checkpoint=self.tokenizer_checkpoint,
        )

    def lm(self) -> LMCosts:
        """The language-model run's share of the costs."""
        return LMCosts(
            step=self.lm_step, compile=self.lm_compile, event=self.lm_event, setup=self.lm_setup
        )

    @classmethod
    def from_record(cls, record: dict) -> Costs:
        """Costs from their ``dataclasses.asdict`` as JSON stored them (lengths as strings)."""
        return cls(**(record | {"lm_step": {int(t): s for t, s in record["lm_step"].items()}}))


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
    tc = TokenizerCosts(step=0.0, gan_step=0.0, event=0.0, setup=0.0)
    if not cfg.tokenizer_from or cfg.tokenizer_long.steps:
        # the long-clip run has no GAN phase
        gan = not cfg.tokenizer_from and has_gan_phase(tok)
        tc = calibrate_tokenizer(tok, scratch / "tokenizer", gan=gan)
    clip, shards_setup, shards = _calibrate_clips(cfg, tokenizer, scratch)
    data = dataclasses.replace(cfg.lm.data, shards=(str(shards),), eval_shards="")
    lm = calibrate_lm(dataclasses.replace(cfg.lm, data=data), scratch / "lm")
    shutil.rmtree(scratch, ignore_errors=True)
    return Costs(
        tokenizer_step=tc.step,
        tokenizer_continuous_step=tc.continuous_step,
        tokenizer_gan_step=tc.gan_step,
        tokenizer_event=tc.event,
        tokenizer_setup=tc.setup,
        tokenizer_evaluation=tc.evaluation,
        tokenizer_preview=tc.preview,
        tokenizer_checkpoint=tc.checkpoint,
        clip=clip,
        shards_setup=shards_setup,
        lm_step=lm.step,
        lm_compile=lm.compile,
        lm_event=lm.event,
        lm_setup=lm.setup,
        seconds=time.monotonic() - started,
    )


def project(cfg: ShapesRecipeConfig, costs: Costs) -> tuple[float, float]:
    """Seconds of ``cfg``'s run on the calibrated machine: (the part that scales with the step
    counts, the part that does not)."""
    tok, variable, fixed = cfg.tokenizer, 0.0, 0.0
    if not cfg.tokenizer_from:
        variable, fixed = tokenizer_seconds(tok, costs.tokenizer())
    long = cfg.tokenizer_long
    if long.steps:  # clips this many times longer: steps as many times slower
        longer = long.n_frames / tok.data.n_frames
        variable += long.steps * costs.tokenizer_step * longer
        every = (long.steps, tok.preview_every, tok.checkpoint_every)  # one evaluation: the last
        run_events = costs.tokenizer().events_seconds(long.steps, *every)
        fixed += (run_events + costs.tokenizer_setup) * longer
    variable += cfg.shards.n_clips * costs.clip
    fixed += cfg.eval_clips * costs.clip + (2 if cfg.eval_clips else 1) * costs.shards_setup
    lm_variable, lm_fixed = lm_seconds(cfg.lm, costs.lm())
    variable += lm_variable
    fixed += lm_fixed
    return variable, fixed


def minutes_of(cfg: ShapesRecipeConfig, costs: Costs) -> float:
    """Projected minutes of ``cfg``'s whole run, the calibration included."""
    variable, fixed = project(cfg, costs)
    return (costs.seconds + fixed + variable) / 60


def factor(cfg: ShapesRecipeConfig, costs: Costs, minutes: float) -> float:
    """The largest share of the configured step counts, at most 1, whose projection fits in
    ``AIM`` of ``minutes`` (:func:`loong.train.budget.fit`)."""
    return fit(lambda share: minutes_of(scale(cfg, share), costs), minutes, "the recipe")


def scale(cfg: ShapesRecipeConfig, share: float) -> ShapesRecipeConfig:
    """``cfg`` with every step count that buys time times ``share`` (see the module docstring);
    ``share`` = 1 returns ``cfg`` itself."""
    if share >= 1.0:
        return cfg
    long = cfg.tokenizer_long
    return dataclasses.replace(
        cfg,
        tokenizer=scale_tokenizer(cfg.tokenizer, share),
        tokenizer_long=dataclasses.replace(
            long, steps=scaled(long.steps, share) if long.steps else 0
        ),
        shards=dataclasses.replace(cfg.shards, n_clips=scaled(cfg.shards.n_clips, share)),
        lm=scale_lm(cfg.lm, share),
    )
