"""Clips for video-tokenizer training: the shapes world, a folder of videos, or tar shards.

Every source resumes exactly from a data position saved in the checkpoint, and under torchrun
each rank takes its rows of the global batch (see :func:`training_batches`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from loong.data.shapes import ShapesWorld, ShapesWorldConfig
from loong.data.sources import source_kind
from loong.data.video import VideoFolder
from loong.train.dist import all_true
from loong.train.runtime import Runtime
from loong.train.tokenizer_config import TokenizerDataConfig

log = logging.getLogger("loong")

HELD_OUT_SEED_OFFSET = 1_000_003
"""Evaluation clips of the shapes world come from seed + this offset, never seen in training."""


def shapes_world(cfg: TokenizerDataConfig, *, held_out: bool = False) -> ShapesWorld:
    seed = cfg.seed + (HELD_OUT_SEED_OFFSET if held_out else 0)
    return ShapesWorld(
        ShapesWorldConfig(
            height=cfg.size, width=cfg.size, fps=cfg.fps, n_frames=cfg.n_frames, seed=seed
        )
    )


def training_batches(
    cfg: TokenizerDataConfig, position: dict[str, int], rows: slice | list[int] = slice(None)
) -> Iterator[torch.Tensor]:
    """Endless batches ``(B, C, T, H, W)`` starting at ``position``, which is updated in place;
    ``rows`` of each (one rank's share of the global batch: a slice or row indices, see
    :func:`micro_batch_rows`).

    The shapes world is indexed, so a position is the number of batches drawn and a rank renders
    only its rows; a folder is read in epochs, so a position is (epoch, batches into the epoch),
    resuming skips to it, and every rank decodes the global batch and keeps its rows. Tar shards
    are read in epochs too, but each rank reads only its own shards (``WebVideoDataset``) and
    batches them into its share: see :func:`shard_batches`.
    """
    mine = range(cfg.batch_size)[rows] if isinstance(rows, slice) else rows
    kind = source_kind(cfg.source)
    if kind == "shards":
        yield from shard_batches(cfg, position, len(mine))
        return
    if kind == "shapes":
        world = shapes_world(cfg)
        first = position.setdefault("batches", 0)
        indices = (
            k * cfg.batch_size + i for k in range(first, len(world) // cfg.batch_size) for i in mine
        )
        loader = DataLoader(
            world, batch_size=len(mine), sampler=indices, num_workers=cfg.num_workers
        )
        for _, video in loader:
            position["batches"] += 1
            yield video
        return
    folder = VideoFolder(
        cfg.source,
        n_frames=cfg.n_frames,
        size=cfg.size,
        fps=cfg.fps,
        seed=cfg.seed,
        jitter=cfg.jitter,
        flip=cfg.flip,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    while True:
        epoch = position.setdefault("epoch", 0)
        skip = position.setdefault("batches", 0)
        folder.set_epoch(epoch)
        loader = DataLoader(
            folder, batch_size=cfg.batch_size, num_workers=cfg.num_workers, drop_last=True
        )
        n = 0
        for n, video in enumerate(loader, start=1):
            if n <= skip:
                continue
            position["batches"] = n
            yield video[rows]
        if n == 0:
            raise ValueError(
                f"{cfg.source} yields no clips of {cfg.n_frames} frames: {folder.summary()}"
            )
        log.info("epoch %d: %s", epoch, folder.summary())
        position.update(epoch=epoch + 1, batches=0)


def micro_batch_rows(batch_size: int, grad_accum: int, rt: Runtime) -> slice | list[int]:
    """This rank's rows of a global batch of ``batch_size`` split into ``grad_accum``
    micro-batches: its equal share of each micro-batch, micro-batch after micro-batch.

    Micro-batch m is rows [m·b, (m+1)·b) of the global batch (b = batch_size / grad_accum), so
    that it holds the same clips whatever the number of ranks, and so do the terms taken over it
    (LFQ's batch entropy, all-reduced over ranks). One micro-batch: the slice of
    :meth:`Runtime.rows`.
    """
    micro = batch_size // grad_accum
    if grad_accum == 1:
        return rt.rows(batch_size, "data.batch_size")
    if micro % rt.world_size:
        raise ValueError(
            f"data.batch_size={batch_size} in grad_accum={grad_accum} micro-batches of {micro} "
            f"clips does not divide among {rt.world_size} ranks: pass a data.batch_size that is "
            f"a multiple of {grad_accum * rt.world_size}"
        )
    share = rt.rows(micro, "data.batch_size / grad_accum")
    return [m * micro + i for m in range(grad_accum) for i in range(micro)[share]]


def shard_batches(
    cfg: TokenizerDataConfig, position: dict[str, int], share: int
) -> Iterator[torch.Tensor]:
    """Endless batches ``(share, C, T, H, W)`` of this rank's clips from the tar shards
    ``cfg.source``, starting at ``position`` (epoch, batches into it; updated in place).

    Each rank reads a disjoint part of every epoch (``WebVideoDataset`` deals the shards, or their
    samples, out to ranks and DataLoader workers), so the global batch differs from a one-rank
    run's. Ranks step together: an epoch ends for all of them when the first runs out of whole
    batches, so with shards of equal size, a multiple of ranks × workers in number, every clip is
    seen exactly once per epoch; with uneven shares, the longer shares' last batches are left out
    of that epoch. Resume needs the same number of ranks (a position saved by another restarts at
    the next epoch). Bad samples are skipped with a warning and counted in each epoch's summary.
    """
    from loong.data.webdataset import WebVideoDataset

    dataset = WebVideoDataset(
        cfg.source, n_frames=cfg.n_frames, size=cfg.size, fps=cfg.fps, seed=cfg.seed
    )
    if position.setdefault("ranks", dataset.world_size) != dataset.world_size:
        log.warning(
            "the data position was saved by %d ranks, not %d: starting the next epoch",
            position["ranks"],
            dataset.world_size,
        )
        position.update(epoch=position.get("epoch", 0) + 1, batches=0, ranks=dataset.world_size)
    while True:
        epoch = position.setdefault("epoch", 0)
        skip = position.setdefault("batches", 0)
        dataset.set_epoch(epoch)
        loader = iter(
            DataLoader(dataset, batch_size=share, num_workers=cfg.num_workers, drop_last=True)
        )
        n = 0
        while all_true((batch := next(loader, None)) is not None):
            n += 1
            if n <= skip:
                continue
            position["batches"] = n
            yield batch["video"]
        if n == 0:
            raise ValueError(
                f"{cfg.source} yields no batch of {share} clips of {cfg.n_frames} frames on some "
                f"rank: {dataset.summary()}"
            )
        log.info("epoch %d: %s", epoch, dataset.summary())
        position.update(epoch=epoch + 1, batches=0)


def held_out_clips(cfg: TokenizerDataConfig, n: int) -> torch.Tensor:
    """``n`` evaluation clips ``(n, C, T, H, W)``: ``cfg.eval_folder`` or unseen shapes seeds."""
    if cfg.eval_folder:
        folder = VideoFolder(
            cfg.eval_folder, n_frames=cfg.n_frames, size=cfg.size, fps=cfg.fps, shuffle=False
        )
        clips = [clip for _, clip in zip(range(n), folder, strict=False)]
        if not clips:
            raise ValueError(f"{cfg.eval_folder} yields no evaluation clips: {folder.summary()}")
        return torch.stack(clips)
    world = shapes_world(cfg, held_out=True)
    return torch.stack([world[i][1] for i in range(n)])
