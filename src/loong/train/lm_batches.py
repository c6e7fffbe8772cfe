"""What one language-model step trains on: micro-batch plans, clip pools, weighted loss.

Each micro-batch draws one length from its stage's mixture and ``batch_size`` items of it from
the token shards (:mod:`loong.data.shards`), uniformly with replacement, with a generator seeded
by (seed, step, micro-batch): the data position is the step, and resuming is exact.

Cropping: the video tokenizer is causal, so the first t′ latent frames of a clip of t > t′ latent
frames are exactly the tokens of its first 1 + 4(t′ − 1) frames. A length with no shards of its
own is therefore made by cropping the longer clips (all groups with t > t′).

Loss (Loong's re-weighting): next-token cross-entropy on the video tokens and EOV only. Each
target token has the weight of its group, ``first_frame`` (latent frame 0), ``short_clip``
(frames 1 .. short_frames − 1) or ``rest``; EOV counts as a token of the last frame. The step's
loss is the weighted mean Σ w·ce / Σ w over all targets of all micro-batches, so weights are
relative (scaling all of them changes nothing) and equal weights give the plain mean. The mean
*unweighted* loss of each latent frame is logged (``loss_frame_k``) to show the imbalance.

Speed: the model is asked for the targets' logits only (``VideoLM(..., output_mask=...)`` with
:func:`target_positions`), and with ``parallel.compile`` the cross-entropy is compiled
(:func:`token_cross_entropy` with ``fused=True``): its fp32 cast, log-softmax and gradient then
run as one pass over the ``(N, V)`` logits. On 2 CPU cores with the ``shapes`` preset the head
and loss were the larger part of a step's time outside the blocks (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from loong.data.shards import EVAL_DIR, META_FILE, TokenShards, check_compatible
from loong.lm.vocab import Batch, Vocabulary
from loong.text_tokenizer import TextTokenizer
from loong.train.lm_config import LMDataConfig, LMTrainConfig, LossWeightConfig, StageConfig

log = logging.getLogger(__name__)

EVAL_SEED_OFFSET = 1_000_003
"""The fixed evaluation items are drawn with seed + this offset."""


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


def noisy_inputs(
    batch: Batch,
    vocab: Vocabulary,
    rate: float,
    seed: tuple[int, ...],
    *,
    erase: float = 0.0,
    spill: float = 0.0,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``batch.token_ids`` ``(B, L)`` with three kinds of noise on the video tokens, in the input.

    ``erase`` (``LMDataConfig.context_erase``): a share of the object cells, the cells whose id
    is not the most common id of their latent frame, take that most common id (the frame's
    background) instead. ``spill`` (``LMDataConfig.context_spill``, needs the latent frame's
    ``grid`` (h, w)): a share of the background cells with an object cell among their
    4-neighbours take the id of one of those neighbours, drawn uniformly. Then ``rate``
    (``LMDataConfig.context_noise``): a share of all video tokens take the id at another video
    position of the same row, drawn uniformly.

    Erase and spill read the clean ids, so the two never touch the same cell. A pure function
    of ``seed`` (the trainer passes (seed, step, micro-batch)), so resuming draws the same
    noise. The draws are made in the order swap, erase, spill, so turning erase or spill on
    leaves the draws before it as they were. A row's video ids are contiguous (BOV … EOV),
    which the draws use.
    """
    ids = batch.token_ids
    if rate == 0.0 and erase == 0.0 and spill == 0.0:
        return ids
    g = torch.Generator().manual_seed(int(np.random.default_rng(list(seed)).integers(2**62)))
    is_video = vocab.is_video(ids)  # (B, L)
    n_video = is_video.sum(dim=1, keepdim=True)  # (B, 1)
    first = is_video.long().argmax(dim=1, keepdim=True)  # (B, 1) first video position
    u = torch.rand((2, *ids.shape), generator=g).to(ids.device)  # drawn on the CPU: seeded
    noisy = ids
    if erase > 0.0 or spill > 0.0:
        background = frame_backgrounds(ids, batch.frame_index, vocab)  # (B, L)
        is_object = ids != background  # other positions keep their own id
    if erase > 0.0:
        hit = is_object & (torch.rand(ids.shape, generator=g).to(ids.device) < erase)
        noisy = torch.where(hit, background, ids)
    if spill > 0.0:
        if grid is None:
            raise ValueError("spill needs grid, the latent frame's (h, w)")
        neighbour = object_neighbours(is_video, is_object, grid, g)  # (B, L)
        hit = ~is_object & (neighbour >= 0)  # background video cells touching an object
        hit &= torch.rand(ids.shape, generator=g).to(ids.device) < spill
        noisy = torch.where(hit, ids.gather(1, neighbour.clamp_min(0)), noisy)
    pick = first + (u[0] * n_video).long()  # (B, L)
    hit = is_video & (u[1] < rate)
    return torch.where(hit, noisy.gather(1, pick.clamp(max=ids.shape[1] - 1)), noisy)


def object_neighbours(
    is_video: torch.Tensor,
    is_object: torch.Tensor,
    grid: tuple[int, int],
    generator: torch.Generator,
) -> torch.Tensor:
    """For each position of a ``(B, L)`` row of ids, given which are video and which objects,
    the position of one of its object 4-neighbours in the same latent frame, drawn uniformly
    among them; −1 where it has none (and off video).

    Video tokens are laid out frame by frame, each frame's ``h × w`` cells in raster order, from
    the row's first video position on.
    """
    h, w = grid
    b, n = is_video.shape
    device = is_video.device
    pos = torch.arange(n, device=device).expand(b, n)  # (B, L)
    cell = (is_video.long().cumsum(dim=1) - 1) % (h * w)  # (B, L) index inside the frame
    row, col = cell // w, cell % w
    best = torch.full((b, n), -1, dtype=torch.long, device=device)
    best_score = torch.full((b, n), -1.0, device=device)
    score = torch.rand((4, b, n), generator=generator).to(device)  # a random pick of four
    for k, (step, inside) in enumerate(
        ((-w, row > 0), (w, row < h - 1), (-1, col > 0), (1, col < w - 1))
    ):
        src = (pos + step).clamp(0, n - 1)  # (B, L)
        ok = is_video & inside & is_object.gather(1, src)
        better = ok & (score[k] > best_score)
        best = torch.where(better, src, best)
        best_score = torch.where(better, score[k], best_score)
    return best


def frame_backgrounds(
    ids: torch.Tensor, frame_index: torch.Tensor, vocab: Vocabulary
) -> torch.Tensor:
    """The most common id of each video token's (row, latent frame), ``(B, L)``, aligned with
    ``ids``; ties go to the smallest id. Positions that are not video keep their own id."""
    is_video = vocab.is_video(ids)  # (B, L)
    n_frames = int(frame_index.max()) + 1  # text, specials and padding are −1
    group = torch.arange(ids.shape[0], device=ids.device)[:, None] * n_frames + frame_index
    group, values = group[is_video], ids[is_video] - vocab.video_offset  # (N,)
    counts = torch.zeros(  # (B·t, video vocabulary)
        ids.shape[0] * max(n_frames, 1), vocab.config.video_vocab_size, device=ids.device
    )
    counts.index_put_(
        (group, values), torch.ones_like(values, dtype=torch.float32), accumulate=True
    )
    out = ids.clone()
    out[is_video] = counts.argmax(dim=1)[group] + vocab.video_offset
    return out


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


def target_positions(batch: Batch, vocab: Vocabulary) -> torch.Tensor:
    """``(B, L)`` bool: the positions whose logits predict a target (``loss_targets``' mask, whose
    column i is token i + 1, moved to the predicting position i). Pass it to the model as
    ``output_mask`` to get just the rows :func:`weighted_loss` reads."""
    mask, _, _ = loss_targets(batch, vocab)
    return F.pad(mask, (0, 1), value=False)


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, fused: bool = False
) -> torch.Tensor:
    """Cross-entropy ``(N,)`` of logits ``(N, V)`` (any float dtype, computed in fp32) at
    ``targets`` ``(N,)``. ``fused``: the same through ``torch.compile`` (one graph for every N)."""
    if fused:
        return _compiled_cross_entropy()(logits, targets)
    return _cross_entropy(logits, targets)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="none")


@functools.cache
def _compiled_cross_entropy():
    return torch.compile(_cross_entropy, dynamic=True)


def weighted_loss(
    logits: torch.Tensor,
    batch: Batch,
    vocab: Vocabulary,
    cfg: LossWeightConfig,
    normaliser: torch.Tensor | None = None,
    *,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ w·ce / normaliser (default Σ w of this batch) for the batch's logits: all of them
    ``(B, L, V)``, or the targets' rows ``(N, V)`` (the model's output at
    :func:`target_positions`). ``fused``: see :func:`token_cross_entropy`.

    Also returns, per target (N,): the unweighted ce (detached), latent frame and EOV flag.
    """
    mask, frames, is_eov = loss_targets(batch, vocab)
    targets = batch.token_ids[:, 1:][mask]  # (N,)
    if logits.ndim == 3:
        logits = logits[:, :-1][mask]  # (N, V)
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"logits hold {logits.shape[0]} rows but the batch has {targets.shape[0]} targets: "
            "pass the logits of every position or those at target_positions(batch, vocab)"
        )
    ce = token_cross_entropy(logits, targets, fused=fused)  # (N,)
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


TRAINING_SAMPLE = "a fixed sample of the training items, not held out"


def _holds_out(shards: TokenShards, evaluation: TokenShards) -> bool:
    """Whether ``evaluation`` (``shards``' ``EVAL_DIR``) holds the files ``shards`` left out:
    both were made from one folder at one ``eval_share`` (else it is another run's)."""
    held, params = evaluation.meta["params"], shards.meta["params"]
    same = all(held.get(k) == params.get(k) for k in {*held, *params} - {"held_out"})
    if not (same and held.get("held_out") and params.get("held_out") is False):
        log.warning("%s is not what %s held out: not evaluated on", EVAL_DIR, shards.directory)
        return False
    return True


def evaluation_shards(
    cfg: LMTrainConfig, shards: list[TokenShards]
) -> tuple[list[TokenShards], str, bool]:
    """The shards evaluation reads, what they are in words, and whether training never reads
    them: ``data.eval_shards`` when set; else the held-out shards ``loong lm tokenize`` wrote
    beside a folder's (``EVAL_DIR`` in a training shards directory); else the training shards
    (a fixed training sample, not a held-out score)."""
    if cfg.data.eval_shards:
        return [TokenShards(cfg.data.eval_shards)], f"held-out shards {cfg.data.eval_shards}", True
    source = []
    for s in shards:
        if (s.directory / EVAL_DIR / META_FILE).is_file():
            evaluation = TokenShards(s.directory / EVAL_DIR)
            source += [evaluation] if _holds_out(s, evaluation) else []
    if source:
        check_compatible(shards + source)
        held = [s.directory for s in source]
        names, n = ", ".join(str(d) for d in held), sum(map(len, source))
        return source, f"held-out shards {names} ({n} item{'s' * (n != 1)})", True
    return shards, f"{TRAINING_SAMPLE}: set data.eval_shards", False


@dataclass
class EvalSet:
    """Fixed evaluation batches and what they were drawn from."""

    batches: list[Batch]
    what: str
    """In words (:func:`evaluation_shards`)."""
    held_out: bool
    """Whether training never reads them."""


def make_eval_batches(
    cfg: LMTrainConfig, shards: list[TokenShards], text: TextTokenizer, vocab: Vocabulary
) -> list[Batch]:
    """:func:`evaluation_set`'s batches."""
    return evaluation_set(cfg, shards, text, vocab).batches


def evaluation_set(
    cfg: LMTrainConfig, shards: list[TokenShards], text: TextTokenizer, vocab: Vocabulary
) -> EvalSet:
    """Fixed evaluation batches: ``eval_items`` items of every stage length, main captions,
    from :func:`evaluation_shards`; lengths the held-out shards have no item of are left out,
    and held-out shards ``loong lm tokenize`` wrote with no item at all (its held-out files
    skipped) give way to the training shards. The caller says what they are (``what``)."""
    source, what, held_out = evaluation_shards(cfg, shards)
    lengths = sorted({t for stage in cfg.stages for t in stage.lengths})
    pools = {t: ClipPool(source, t) for t in lengths}
    missing = [t for t, pool in pools.items() if len(pool) == 0]
    if held_out and len(missing) == len(lengths):
        if cfg.data.eval_shards:
            raise ValueError(
                f"data.eval_shards {cfg.data.eval_shards} holds no items of the latent lengths "
                f"{lengths} the stages train on: tokenize held-out videos into it"
            )
        log.warning("evaluation: the held-out shards (%s) hold no items", what)
        pools, what, held_out = {t: ClipPool(shards, t) for t in lengths}, TRAINING_SAMPLE, False
        missing = []
    if missing:
        log.warning("evaluation: no held-out items of latent length %s: left out", missing)
    batches = []
    for t, pool in pools.items():
        if len(pool) == 0:
            continue
        rng = np.random.default_rng([cfg.seed + EVAL_SEED_OFFSET, t])
        items = rng.choice(len(pool), size=min(cfg.eval_items, len(pool)), replace=False)
        for chunk in np.array_split(items, max(1, math.ceil(len(items) / cfg.batch_size))):
            n = len(chunk)
            plan = Plan(length=t, items=chunk.tolist(), drop_caption=[False] * n, wording=[1.0] * n)
            batches.append(make_batch(plan, pool, text, vocab, cfg.data))
    return EvalSet(batches=batches, what=what, held_out=held_out)


def to_device(batch: Batch, device: torch.device) -> Batch:
    return Batch(
        token_ids=batch.token_ids.to(device),
        frame_index=batch.frame_index.to(device),
        attention_mask=batch.attention_mask.to(device),
    )
