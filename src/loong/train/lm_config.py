"""Configs of language-model training: stages, loss weights, data, and the presets.

Loong (Wang et al. 2024) trains in stages: text → image (one latent frame), then images and short
clips, then images, short and long clips. A stage is a mixture of latent lengths t with sampling
weights; the stage at step s is a pure function of the config (:func:`stage_at`). The loop that
runs them is :func:`loong.train.lm.train_lm`; what a step trains on is
:mod:`loong.train.lm_batches`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from loong.lm.model import VideoLMConfig
from loong.train.optim import OptimConfig
from loong.train.parallel import ParallelConfig


@dataclass(kw_only=True)
class StageConfig:
    name: str = "stage"
    """Shown in the progress bar and logs."""
    steps: int = 1000
    """Optimizer steps of this stage."""
    lengths: tuple[int, ...] = (1,)
    """Latent lengths t the stage trains on (1: images; 5: 17-frame clips; 17: 65 frames)."""
    weights: tuple[float, ...] = ()
    """Sampling weight of each length (relative); empty: uniform."""

    def __post_init__(self) -> None:
        self.lengths, self.weights = tuple(self.lengths), tuple(self.weights)
        if self.steps < 1 or not self.lengths or min(self.lengths) < 1:
            raise ValueError(
                f"stage {self.name!r}: steps and every length must be >= 1 and lengths "
                f"non-empty, got steps={self.steps}, lengths={self.lengths}"
            )
        if self.weights and (
            len(self.weights) != len(self.lengths) or min(self.weights) < 0 or not any(self.weights)
        ):
            raise ValueError(
                f"stage {self.name!r}: weights must be one non-negative number per length "
                f"({len(self.lengths)}), not all zero; got {self.weights}"
            )


@dataclass(kw_only=True)
class LossWeightConfig:
    first_frame: float = 2.0
    """Weight of latent frame 0's tokens: the hardest, predicted from text alone (≈)."""
    short_clip: float = 1.0
    """Weight of frames 1 .. short_frames − 1."""
    rest: float = 0.5
    """Weight of frames from short_frames on: mostly copied from earlier frames (≈)."""
    short_frames: int = 5
    """Latent frames of a short clip (Loong: 17 frames → 5)."""

    def __post_init__(self) -> None:
        if min(self.first_frame, self.short_clip, self.rest) < 0 or self.short_frames < 1:
            raise ValueError("loss weights must be >= 0 and short_frames >= 1")


@dataclass(kw_only=True)
class LMDataConfig:
    shards: tuple[str, ...] = ("runs/shards",)
    """Token-shard directories (``loong lm tokenize``); one video tokenizer for all."""
    text_tokenizer: str = ""
    """tokenizer.json of the text tokenizer; empty: the one in the first shards directory."""
    eval_shards: str = ""
    """Held-out shards for evaluation; empty: the held-out shards ``loong lm tokenize`` wrote in
    ``eval/`` of the training shards directories (a folder's ``eval_share`` of its videos), or,
    without any, a fixed sample of training items (said in the log)."""
    caption_dropout: float = 0.1
    """Share of items trained with the empty caption, for classifier-free guidance."""
    alternate_caption_prob: float = 0.5
    """Share of items that use one of their alternate wordings (paraphrases), when they have any."""
    max_text_tokens: int = 64
    """Captions are cut to this many text ids."""
    context_noise: float = 0.0
    """Share of video tokens replaced, in the model's input only, by the id at another cell of
    the same clip drawn at random; the targets stay the clip's own. Sampling feeds the model its
    own mistakes as context, which training on clean clips never shows it; this is practice at
    continuing from a context that is partly wrong. 0: off."""
    context_erase: float = 0.0
    """Share of object cells (ids other than their latent frame's most common id) replaced, in
    the model's input only, by that most common id: the object is partly wiped from the context
    while the targets still show it whole. A sampled object that loses a cell to the background
    tends to lose more in the frames after; this is practice at keeping it. 0: off."""
    context_spill: float = 0.0
    """Share of background cells next to an object (a 4-neighbour in the same latent frame)
    given, in the model's input only, the id of one of those object neighbours: the object is
    partly grown in the context while the targets keep its true outline. A sampled object that
    gains a cell tends to keep it and gain more; this is practice at trimming it back, the
    mirror of ``context_erase``. Needs ``model.video_grid``. 0: off."""

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            self.shards = (self.shards,)
        self.shards = tuple(self.shards)
        if not self.shards:
            raise ValueError("data.shards needs at least one token-shards directory")
        for name in (
            "caption_dropout",
            "alternate_caption_prob",
            "context_noise",
            "context_erase",
            "context_spill",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_text_tokens < 0:
            raise ValueError(f"data.max_text_tokens must be >= 0, got {self.max_text_tokens}")


@dataclass(kw_only=True)
class LMTrainConfig:
    model: VideoLMConfig = field(default_factory=VideoLMConfig)
    """The language model to train."""
    data: LMDataConfig = field(default_factory=LMDataConfig)
    """Token shards, text tokenizer and caption augmentation."""
    stages: tuple[StageConfig, ...] = field(default_factory=lambda: loong_stages())
    """Progressive short-to-long schedule, run in order."""
    loss: LossWeightConfig = field(default_factory=LossWeightConfig)
    """Per-group loss weights."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.1, warmup_steps=200)
    )
    """Optimizer and schedule."""
    batch_size: int = 16
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seed: int = 0
    """Seed of the initialisation and of the data order."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu", "cuda", ...; under torchrun each rank takes its GPU."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Data parallelism under torchrun (batch_size is the global micro-batch, split over ranks),
    bf16 autocast on CUDA (and on CPUs when asked), activation checkpointing, compile."""
    log_every: int = 10
    """Steps between metrics.jsonl lines (per-frame losses are averaged over them)."""
    eval_every: int = 500
    """Steps between evaluations (and one at the end)."""
    eval_items: int = 32
    """Evaluation items per latent length."""
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    export_best: bool = True
    """Keep ``OUT/best``: the export of the weights with the lowest evaluation loss so far, and
    ``best.json`` with its step and scores (``OUT/export`` is always the last weights). A
    choice by held-out items when the evaluation reads held-out shards (the log says whether
    it does)."""
    max_minutes: float = 0.0
    """Stop (with a checkpoint and export) after this much wall time; 0: no limit."""
    budget_minutes: float = 0.0
    """Fit the run into this much wall time on this machine: a few real steps of every latent
    length are timed first and, when the configured steps would not fit, every stage's steps
    and the event intervals are scaled by one factor so that the whole progressive schedule
    (its last, longest stage included) completes (:mod:`loong.train.budget`); ``max_minutes``
    then stops the run at the budget at the latest. A resumed run keeps its factor. 0: off,
    every configured step runs. Single-process runs only."""
    tensorboard: bool = True
    """Also log to OUT/tensorboard when the tensorboard package is installed."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = VideoLMConfig(**self.model)
        self.stages = tuple(StageConfig(**s) if isinstance(s, dict) else s for s in self.stages)
        if not self.stages:
            raise ValueError("stages must hold at least one stage")
        for name in ("batch_size", "grad_accum", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_minutes", "budget_minutes"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {value}")
        if self.data.context_spill and self.model.video_grid is None:
            raise ValueError(
                "data.context_spill needs model.video_grid (the latent frame's (h, w)) to find "
                "an object's neighbours; set it or set data.context_spill=0"
            )

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)


def loong_stages() -> tuple[StageConfig, ...]:
    """Loong's three stages: images; + 17-frame clips (t = 5); + 65-frame clips (t = 17).

    Step counts and mixture weights are not the paper's (it gives none we rely on) (≈).
    """
    return (
        StageConfig(name="image", steps=1000, lengths=(1,)),
        StageConfig(name="short", steps=1000, lengths=(1, 5), weights=(1, 3)),
        StageConfig(name="long", steps=2000, lengths=(1, 5, 17), weights=(1, 2, 4)),
    )


def lm_train_preset(name: str) -> LMTrainConfig:
    """A complete LM training config for an LM preset (see ``loong.lm.presets``)."""
    from loong.lm.presets import lm_preset

    model = lm_preset(name)
    if name == "tiny":
        # Shapes world tokenized at 17 frames (t = 5) with stills (t = 1); t = 3 is cropped
        # from the t = 5 clips. On 2 CPU cores a t = 5 step of 8 sequences takes seconds, so
        # the 2,000 steps are hours there; lr higher than for big models.
        return LMTrainConfig(
            model=model,
            stages=(
                StageConfig(name="image", steps=500, lengths=(1,)),
                StageConfig(name="short", steps=500, lengths=(1, 3), weights=(1, 2)),
                StageConfig(name="long", steps=1000, lengths=(1, 3, 5), weights=(1, 1, 2)),
            ),
            loss=LossWeightConfig(short_frames=3),
            optim=OptimConfig(lr=1e-3, warmup_steps=100, weight_decay=0.0),
            batch_size=8,
            eval_every=250,
            checkpoint_every=250,
        )
    if name == "shapes":
        # The bundled model (``loong recipe shapes``): clips of 33 frames (t = 9, 4 s at 8 fps)
        # with 17-frame crops (t = 5) and stills; its time on 2 CPU cores is in BENCHMARKS.md.
        # Canonical captions mostly: paraphrases are seen, but less often than the default's
        # half of the time. A fifth of the input's video ids swapped: with the local video
        # context and clean inputs the sampled objects faded out within seconds, with a tenth
        # in half the videos. Wiping object cells (data.context_erase) made them grow instead;
        # spilling object ids into the background (data.context_spill) kept their size but
        # made them jitter; see BENCHMARKS.md. bf16 on CPUs that compute in it natively:
        # the same held-out losses, about 1.3× faster. Compiled blocks (eager where inductor
        # has no C++ compiler), and with them a compiled loss on the targets' logits only:
        # 1.3-1.4× a step alone, 1.4-1.5× in the training loop. A long last stage (6,500 steps):
        # with 2,000 the held-out loss was still falling; 5,000 lifted the windows passing all
        # checks by 40% in the first ten seconds and 50% over the minute, and two runs of 6,500
        # lifted them again, by 11-13% in the first ten seconds and 11-25% over the minute; one
        # run of 9,000 did not show a further gain (BENCHMARKS.md).
        return LMTrainConfig(
            model=model,
            data=LMDataConfig(alternate_caption_prob=0.2, context_noise=0.2),
            parallel=ParallelConfig(cpu_mixed_precision="auto", compile=True),
            stages=(
                StageConfig(name="image", steps=400, lengths=(1,)),
                StageConfig(name="short", steps=900, lengths=(1, 5), weights=(1, 3)),
                StageConfig(name="long", steps=6500, lengths=(1, 5, 9), weights=(1, 2, 4)),
            ),
            loss=LossWeightConfig(short_frames=5),
            optim=OptimConfig(lr=1e-3, warmup_steps=100, weight_decay=0.0),
            batch_size=8,
            eval_every=500,
            checkpoint_every=250,
        )
    return LMTrainConfig(model=model)  # Loong: images, + 17-frame (t = 5), + 65-frame (t = 17)


def scale_stages(cfg: LMTrainConfig, total_steps: int) -> LMTrainConfig:
    """``cfg`` with every stage's steps scaled so that they add up to ``total_steps``."""
    if total_steps < len(cfg.stages):
        raise ValueError(f"--steps must be at least the number of stages ({len(cfg.stages)})")
    old = [stage.steps for stage in cfg.stages]
    bounds = [round(total_steps * sum(old[: i + 1]) / sum(old)) for i in range(len(old))]
    steps = [max(1, b - a) for a, b in zip([0, *bounds[:-1]], bounds, strict=True)]
    steps[-1] = max(1, total_steps - sum(steps[:-1]))
    stages = tuple(
        dataclasses.replace(st, steps=n) for st, n in zip(cfg.stages, steps, strict=True)
    )
    return dataclasses.replace(cfg, stages=stages)


def stage_at(stages: tuple[StageConfig, ...], step: int) -> int:
    """Index of the stage that trains step ``step`` (0-based); the last one past the end."""
    end = 0
    for i, stage in enumerate(stages):
        end += stage.steps
        if step < end:
            return i
    return len(stages) - 1
