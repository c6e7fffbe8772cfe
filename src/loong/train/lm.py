"""Training loop of the language model: progressive short-to-long, re-weighted loss (Loong).

Loong (Wang et al. 2024) trains in stages: text → image (one latent frame), then images and short
clips, then images, short and long clips. A stage is a mixture of latent lengths t with sampling
weights; the stage at step s is a pure function of the config (:func:`stage_at`). Each
micro-batch draws one length and ``batch_size`` items of it from the token shards
(:mod:`loong.data.shards`), uniformly with replacement, with a generator seeded by (seed, step,
micro-batch): the data position is the step, and resuming is exact.

Cropping: the video tokenizer is causal, so the first t′ latent frames of a clip of t > t′ latent
frames are exactly the tokens of its first 1 + 4(t′ − 1) frames. A length with no shards of its
own is therefore made by cropping the longer clips (all groups with t > t′).

Loss (Loong's re-weighting): next-token cross-entropy on the video tokens and EOV only. Each
target token has the weight of its group, ``first_frame`` (latent frame 0), ``short_clip``
(frames 1 .. short_frames − 1) or ``rest``; EOV counts as a token of the last frame. The step's
loss is the weighted mean Σ w·ce / Σ w over all targets of all micro-batches, so weights are
relative (scaling all of them changes nothing) and equal weights give the plain mean. The mean
*unweighted* loss of each latent frame is logged (``loss_frame_k``) to show the imbalance.

The run directory holds config.json, metrics.jsonl, checkpoints/ (model, optimizer, step, RNG,
log window; the sampler needs nothing more), tensorboard/ (when the package is installed) and
export/: VideoLM's config.json + model.safetensors, the text tokenizer's tokenizer.json,
generation.json (paired video tokenizer, latent grid, clip length, fps: what loong.generate
reads), the shards' meta as shards_meta.json, and the run's train_config.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from loong.config import config_json
from loong.data.shards import TokenShards, check_compatible
from loong.lm.model import VideoLM, VideoLMConfig
from loong.lm.vocab import Batch, Vocabulary
from loong.pretrained import atomic_write_text
from loong.text_tokenizer import TOKENIZER_FILE, TextTokenizer
from loong.train.dist import barrier
from loong.train.optim import OptimConfig
from loong.train.parallel import ParallelConfig, clip_grad_norm_, no_gradient_sync, unwrap
from loong.train.runtime import (
    MetricsLog,
    load_state,
    save_export,
    save_state,
    start,
    summed,
)

log = logging.getLogger("loong")

EVAL_SEED_OFFSET = 1_000_003
"""The fixed evaluation items are drawn with seed + this offset."""


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
    """Held-out shards for evaluation; empty: a fixed sample of training items."""
    caption_dropout: float = 0.1
    """Share of items trained with the empty caption, for classifier-free guidance."""
    alternate_caption_prob: float = 0.5
    """Share of items that use one of their alternate wordings (paraphrases), when they have any."""
    max_text_tokens: int = 64
    """Captions are cut to this many text ids."""

    def __post_init__(self) -> None:
        if isinstance(self.shards, str):
            self.shards = (self.shards,)
        self.shards = tuple(self.shards)
        if not self.shards:
            raise ValueError("data.shards needs at least one token-shards directory")
        for name in ("caption_dropout", "alternate_caption_prob"):
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
    bf16 autocast on CUDA, activation checkpointing, compile."""
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
    max_minutes: float = 0.0
    """Stop (with a checkpoint and export) after this much wall time; 0: no limit."""
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
        # half of the time.
        return LMTrainConfig(
            model=model,
            data=LMDataConfig(alternate_caption_prob=0.2),
            stages=(
                StageConfig(name="image", steps=400, lengths=(1,)),
                StageConfig(name="short", steps=900, lengths=(1, 5), weights=(1, 3)),
                StageConfig(name="long", steps=2000, lengths=(1, 5, 9), weights=(1, 2, 4)),
            ),
            loss=LossWeightConfig(short_frames=5),
            optim=OptimConfig(lr=1e-3, warmup_steps=100, weight_decay=0.0),
            batch_size=8,
            eval_every=500,
            checkpoint_every=250,
        )
    return LMTrainConfig(model=model)  # Loong: images, + 17-frame (t = 5), + 65-frame (t = 17)


# --- schedule, data and loss -----------------------------------------------------------------


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


@dataclass
class Plan:
    """What one micro-batch holds: a pure function of (seed, step, micro-batch)."""

    length: int
    """Latent frames t of every item."""
    items: list[int]
    """Item numbers in the pool of that length."""
    drop_caption: list[bool]
    """Items trained with the empty caption."""
    wording: list[float]
    """Per item, u in [0, 1): < alternate_caption_prob picks an alternate caption."""

    def part(self, rows: slice) -> Plan:
        """The plan of items ``rows`` only: one rank's part of the global micro-batch."""
        return Plan(self.length, self.items[rows], self.drop_caption[rows], self.wording[rows])


def draw_plan(
    stage: StageConfig, pool_sizes: dict[int, int], cfg: LMTrainConfig, step: int, micro: int
) -> Plan:
    """Draw micro-batch ``micro`` of step ``step``: its length from the stage's mixture, items
    uniformly (with replacement) from the pool of that length, and the caption choices."""
    rng = np.random.default_rng([cfg.seed, step, micro])
    weights = np.asarray(stage.weights or [1.0] * len(stage.lengths), dtype=np.float64)
    length = stage.lengths[int(rng.choice(len(stage.lengths), p=weights / weights.sum()))]
    n = cfg.batch_size
    return Plan(
        length=length,
        items=rng.integers(pool_sizes[length], size=n).tolist(),
        drop_caption=(rng.random(n) < cfg.data.caption_dropout).tolist(),
        wording=rng.random(n).tolist(),
    )


class ClipPool:
    """Items of latent length t: the shards' group t, or else every longer group, cropped."""

    def __init__(self, shards: list[TokenShards], length: int) -> None:
        exact = [(s, t) for s in shards for t in s.lengths if t == length]
        self.sources = exact or [(s, t) for s in shards for t in s.lengths if t > length]
        self.length = length
        self.offsets = np.cumsum([0] + [s.count(t) for s, t in self.sources])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, j: int) -> tuple[dict, torch.Tensor]:
        """Item j's record and indices ``(length, h, w)``."""
        k = int(np.searchsorted(self.offsets, j, side="right")) - 1
        shards, t = self.sources[k]
        i = j - int(self.offsets[k])
        return shards.record(t, i), shards.indices(t, i)[: self.length]


def make_batch(
    plan: Plan, pool: ClipPool, text: TextTokenizer, vocab: Vocabulary, data: LMDataConfig
) -> Batch:
    """The planned items as right-padded ``[BOS] text [BOV] video [EOV] [EOS]`` sequences."""
    layouts = []
    for j, drop, u in zip(plan.items, plan.drop_caption, plan.wording, strict=True):
        record, indices = pool.get(j)  # (t, h, w)
        caption = record["caption"]
        if record["alternates"] and u < data.alternate_caption_prob:
            pick = int(u / data.alternate_caption_prob * len(record["alternates"]))
            caption = record["alternates"][pick]
        ids = [] if drop else text.encode(caption)[: data.max_text_tokens]
        layouts.append(vocab.layout(ids, indices))
    return vocab.collate(layouts)


def loss_targets(batch: Batch, vocab: Vocabulary) -> tuple[torch.Tensor, ...]:
    """Masks over next-token targets ``(B, L − 1)``: logits at i predict token i + 1.

    Returns ``mask`` (the target is a video id or EOV, not padding), ``frames`` (the target's
    latent frame; EOV takes the last frame's) and ``is_eov``.
    """
    targets = batch.token_ids[:, 1:]
    is_eov = targets == vocab.eov
    mask = batch.attention_mask[:, 1:] & (vocab.is_video(targets) | is_eov)
    frames = torch.where(is_eov, batch.frame_index[:, :-1], batch.frame_index[:, 1:])
    return mask, frames, is_eov


def token_weights(frames: torch.Tensor, cfg: LossWeightConfig) -> torch.Tensor:
    """Loss weight of each target from its latent frame (same shape as ``frames``)."""
    w = torch.full(frames.shape, cfg.rest, device=frames.device)
    w = torch.where(frames < cfg.short_frames, cfg.short_clip, w)
    return torch.where(frames == 0, cfg.first_frame, w)


def batch_weight(batch: Batch, vocab: Vocabulary, cfg: LossWeightConfig) -> torch.Tensor:
    """Σ w over the batch's targets: the normaliser of the weighted mean."""
    mask, frames, _ = loss_targets(batch, vocab)
    return token_weights(frames[mask], cfg).sum()


def weighted_loss(
    logits: torch.Tensor,
    batch: Batch,
    vocab: Vocabulary,
    cfg: LossWeightConfig,
    normaliser: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ w·ce / normaliser (default Σ w of this batch) for logits ``(B, L, V)``.

    Also returns, per target (N,): the unweighted ce (detached), latent frame and EOV flag.
    """
    mask, frames, is_eov = loss_targets(batch, vocab)
    targets = batch.token_ids[:, 1:][mask]  # (N,)
    ce = F.cross_entropy(logits[:, :-1][mask].float(), targets, reduction="none")  # (N,)
    w = token_weights(frames[mask], cfg)
    norm = (w.sum() if normaliser is None else normaliser).clamp_min(1e-12)  # all weights 0
    return (w * ce).sum() / norm, ce.detach(), frames[mask], is_eov[mask]


def add_frame_losses(
    window: dict[str, list[float]], ce: torch.Tensor, frames: torch.Tensor, is_eov: torch.Tensor
) -> None:
    """Add per-target ce (N,) to ``window``'s ``loss_frame_k`` [sum, count] (video tokens only)."""
    video = ~is_eov
    sums = torch.bincount(frames[video], weights=ce[video].double()).tolist()
    counts = torch.bincount(frames[video]).tolist()
    for k, (total, n) in enumerate(zip(sums, counts, strict=True)):
        if n:
            acc = window.setdefault(f"loss_frame_{k}", [0.0, 0])
            acc[0], acc[1] = acc[0] + total, acc[1] + n


def frame_means(window: dict[str, list[float]]) -> dict[str, float]:
    """``{"loss_frame_k": mean}`` in frame order."""
    keys = sorted(window, key=lambda k: int(k.rsplit("_", 1)[1]))
    return {k: window[k][0] / window[k][1] for k in keys}


def make_eval_batches(
    cfg: LMTrainConfig, shards: list[TokenShards], text: TextTokenizer, vocab: Vocabulary
) -> list[Batch]:
    """Fixed evaluation batches: ``eval_items`` items of every stage length, main captions.

    From ``data.eval_shards`` when set, else from the training shards (then it is a fixed
    training sample, not a held-out score).
    """
    source = [TokenShards(cfg.data.eval_shards)] if cfg.data.eval_shards else shards
    batches = []
    for t in sorted({t for stage in cfg.stages for t in stage.lengths}):
        pool = ClipPool(source, t)
        rng = np.random.default_rng([cfg.seed + EVAL_SEED_OFFSET, t])
        items = rng.choice(len(pool), size=min(cfg.eval_items, len(pool)), replace=False)
        for chunk in np.array_split(items, max(1, math.ceil(len(items) / cfg.batch_size))):
            n = len(chunk)
            plan = Plan(length=t, items=chunk.tolist(), drop_caption=[False] * n, wording=[1.0] * n)
            batches.append(make_batch(plan, pool, text, vocab, cfg.data))
    return batches


@torch.no_grad()
def evaluate_lm(
    model: VideoLM, batches: list[Batch], vocab: Vocabulary, device: torch.device
) -> dict[str, float]:
    """Unweighted mean loss over video and EOV targets (``loss``) and per latent frame."""
    was_training = model.training
    model.eval()
    window: dict[str, list[float]] = {}
    total, count = 0.0, 0
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(batch.token_ids)  # (B, L, V)
        _, ce, frames, is_eov = weighted_loss(logits, batch, vocab, LossWeightConfig())
        total, count = total + ce.sum().item(), count + len(ce)
        add_frame_losses(window, ce.cpu(), frames.cpu(), is_eov.cpu())
    model.train(was_training)
    return {"loss": total / count, **frame_means(window)}


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(
        token_ids=batch.token_ids.to(device),
        frame_index=batch.frame_index.to(device),
        attention_mask=batch.attention_mask.to(device),
    )


def text_path(cfg: LMTrainConfig) -> Path:
    """The text tokenizer file a run uses."""
    return Path(cfg.data.text_tokenizer or Path(cfg.data.shards[0]) / TOKENIZER_FILE)


def open_data(cfg: LMTrainConfig) -> tuple[list[TokenShards], TextTokenizer, Vocabulary]:
    """Shards, text tokenizer and vocabulary, checked against the model config."""
    shards = [TokenShards(d) for d in cfg.data.shards]
    check_compatible(shards)
    for s in shards:
        if len(s) == 0:
            raise ValueError(f"{s.directory} holds no items: see skipped in its meta.json")
    vocab_cfg, (h, w) = cfg.model.vocab, shards[0].grid
    if shards[0].video_vocab_size != vocab_cfg.video_vocab_size:
        raise ValueError(
            f"the shards' video tokenizer has {shards[0].video_vocab_size} codes but "
            f"model.vocab.video_vocab_size is {vocab_cfg.video_vocab_size}: make them equal"
        )
    grid = cfg.model.video_grid
    if grid is not None and tuple(grid) != (h, w):
        raise ValueError(
            f"model.video_grid is {tuple(grid)} but the shards' latent frames are {h}×{w}: set "
            f"model.video_grid = [{h}, {w}] (or None for RoPE positions alone)"
        )
    longest = max(max(s.lengths) for s in shards)
    for stage in cfg.stages:
        if max(stage.lengths) > longest:
            raise ValueError(
                f"stage {stage.name!r} asks for {max(stage.lengths)} latent frames but the "
                f"longest shards hold {longest}: tokenize longer clips or drop that length"
            )
    need = cfg.data.max_text_tokens + 4 + h * w * max(max(s.lengths) for s in cfg.stages)
    if need > cfg.model.max_seq_len:
        raise ValueError(
            f"sequences need up to {need} positions (text {cfg.data.max_text_tokens} + 4 "
            f"specials + video), more than model.max_seq_len={cfg.model.max_seq_len}"
        )
    text = TextTokenizer.load(text_path(cfg))
    if text.vocab_size > vocab_cfg.text_vocab_size:
        raise ValueError(
            f"the text tokenizer has {text.vocab_size} ids, more than model.vocab."
            f"text_vocab_size={vocab_cfg.text_vocab_size}: raise it or retrain the tokenizer"
        )
    return shards, text, Vocabulary(vocab_cfg)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("TensorBoard logging off: the tensorboard package is not installed")
        return None
    return SummaryWriter(str(out / "tensorboard"))


def write_generation_file(export: Path, meta: dict, cfg: LMTrainConfig) -> None:
    """``generation.json`` as :mod:`loong.generate` reads it: the paired video tokenizer, latent
    grid, trained clip length (the longest stage length), fps and frame size of the clips."""
    path = meta["video_tokenizer"]["path"]
    if path is None:
        log.warning("no generation.json: the shards do not name their video tokenizer directory")
        return
    info = {
        "video_tokenizer": path,
        "latent_grid": meta["grid"],
        "clip_latents": max(max(stage.lengths) for stage in cfg.stages),
        "fps": meta["fps"],
        "frame_size": [meta["size"], meta["size"]],
    }
    atomic_write_text(export / "generation.json", json.dumps(info, indent=2) + "\n")


# --- the loop --------------------------------------------------------------------------------


def train_lm(cfg: LMTrainConfig, out_dir: str | Path, *, progress: bool = True) -> Path:
    """Train (or resume) a language-model run in ``out_dir``; returns the export directory.

    Under torchrun every rank calls it: each trains on its rows of every micro-batch and rank 0
    writes the files (see :mod:`loong.train.runtime`).
    """
    rt = start(cfg.parallel, cfg.device)
    rows = rt.rows(cfg.batch_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rt.main:
        atomic_write_text(out / "config.json", config_json(cfg))
    # Subnormal floats make CPU kernels crawl (a tokenizer step on real video ran 3.5× slower);
    # flushing them to zero changes nothing measurable.
    torch.set_flush_denormal(True)
    device = rt.device

    # 0. data, model, optimizer, resume
    shards, text, vocab = open_data(cfg)
    pools = {t: ClipPool(shards, t) for stage in cfg.stages for t in stage.lengths}
    sizes = {t: len(pool) for t, pool in pools.items()}
    eval_set = make_eval_batches(cfg, shards, text, vocab)
    torch.manual_seed(cfg.seed)
    model = VideoLM(cfg.model)
    log.info(
        "language model: %s parameters; shards %s items by t: %s",
        f"{model.num_parameters():,}",
        f"{sum(len(s) for s in shards):,}",
        sizes,
    )
    model = rt.wrap(model)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay}],
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        weight_decay=0.0,
    )
    step, window = 0, {}
    trained = {"modules": {"model": model}, "optimizers": {"optimizer": opt}}
    state = load_state(out / "checkpoints", rt, **trained)
    if state is not None:
        step, window = state["step"], state["window"]
        log.info("resumed from step %d", step)
    writer = _tensorboard(out) if cfg.tensorboard and rt.main else None
    total = cfg.total_steps
    bar = tqdm(
        total=total, initial=step, disable=not (progress and rt.main), desc="lm", dynamic_ncols=True
    )
    say = bar.write if rt.main else log.debug
    started = time.monotonic()
    metrics = MetricsLog(out / "metrics.jsonl", step, rt)
    stage_index = -1

    while step < total:
        # 1. batch: this rank's part of the stage's micro-batches; the step's normaliser Σ w
        # over all ranks, so that every token weighs the same whatever the number of ranks
        if stage_at(cfg.stages, step) != stage_index:
            stage_index = stage_at(cfg.stages, step)
            stage = cfg.stages[stage_index]
            say(f"step {step}: stage {stage.name!r}, latent lengths {stage.lengths}")
        plans = [draw_plan(stage, sizes, cfg, step, m) for m in range(cfg.grad_accum)]
        batches = [make_batch(p.part(rows), pools[p.length], text, vocab, cfg.data) for p in plans]
        local_norm = sum(batch_weight(b, vocab, cfg.loss) for b in batches)
        norm = torch.tensor(summed({"norm": [local_norm.item()]})["norm"][0], device=device)
        lr = cfg.optim.lr_at(step, total)
        for group in opt.param_groups:
            group["lr"] = lr

        # 2. forward and backward, one micro-batch at a time; gradients are averaged over
        # ranks once, in the last micro-batch's backward, hence the sum Σ w·ce times the ranks
        model.train()
        loss_sum, ce_sum, n_targets, frame_window = 0.0, 0.0, 0, {}
        for m, batch in enumerate(batches):
            batch = to_device(batch, device)
            with nullcontext() if m == len(batches) - 1 else no_gradient_sync(model):
                with rt.autocast():
                    logits = model(batch.token_ids)  # (B, L, V)
                loss, ce, frames, is_eov = weighted_loss(logits, batch, vocab, cfg.loss, norm)
                (loss * rt.world_size).backward()
            loss_sum += loss.item()
            ce_sum, n_targets = ce_sum + ce.sum().item(), n_targets + len(ce)
            add_frame_losses(frame_window, ce.cpu(), frames.cpu(), is_eov.cpu())

        # 3. update
        grad_norm = clip_grad_norm_(
            model.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        # 4. logs (summed over ranks), evaluation, checkpoints
        sums = summed({"loss": [loss_sum], "ce": [ce_sum, n_targets]} | frame_window)
        for key in (k for k in sums if k.startswith("loss_frame_")):
            acc = window.setdefault(key, [0.0, 0])
            acc[0], acc[1] = acc[0] + sums[key][0], acc[1] + sums[key][1]
        bar.update(1)
        bar.set_postfix(stage=stage.name, loss=f"{sums['loss'][0]:.4f}", refresh=False)
        record = {
            "step": step,
            "stage": stage.name,
            "lengths": [p.length for p in plans],
            "lr": lr,
            "loss": sums["loss"][0],
            "loss_unweighted": sums["ce"][0] / sums["ce"][1],
            "grad_norm": grad_norm.item(),
        }
        done = step == total or (
            cfg.max_minutes > 0 and rt.agree(time.monotonic() - started > 60 * cfg.max_minutes)
        )
        if step % cfg.log_every == 0 or done:
            record |= frame_means(window)
            window = {}
        if step % cfg.eval_every == 0 or done:
            # every rank evaluates all batches (FSDP needs every rank for a forward pass)
            result = evaluate_lm(unwrap(model), eval_set, vocab, device)
            record |= {f"eval_{k}": v for k, v in result.items()}
            say(f"step {step}: eval loss {result['loss']:.4f}")
        if step % cfg.log_every == 0 or "eval_loss" in record:
            metrics.write(record)
            if writer is not None:
                for key, value in record.items():
                    if isinstance(value, float):
                        writer.add_scalar(key, value, step)
        if step % cfg.checkpoint_every == 0 or done:
            extra = {"step": step, "data_position": {"step": step}, "window": window}
            save_state(
                out / "checkpoints",
                rt,
                **trained,
                extra=extra,
                step=step,
                keep=cfg.keep_checkpoints,
            )
        if done:
            break

    bar.close()
    metrics.close()
    if writer is not None:
        writer.close()
    export = out / "export"
    save_export(model, rt, lambda: VideoLM(cfg.model), export)
    if rt.main:
        shutil.copyfile(text_path(cfg), export / TOKENIZER_FILE)
        meta = json.dumps(shards[0].meta, indent=2) + "\n"
        atomic_write_text(export / "shards_meta.json", meta)
        write_generation_file(export, shards[0].meta, cfg)
        atomic_write_text(export / "train_config.json", config_json(cfg))
    barrier()
    return export
