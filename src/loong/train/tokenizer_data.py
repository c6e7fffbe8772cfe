"""Clips for video-tokenizer training: the shapes world, a folder of videos, or tar shards.

Every source resumes exactly from a data position saved in the checkpoint, and under torchrun
each rank takes its rows of the global batch (see :func:`training_batches`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from loong.data.shapes import ShapesWorld, ShapesWorldConfig
from loong.data.sources import source_kind
from loong.data.video import VideoFolder, held_out_files, list_video_files
from loong.pretrained import atomic_write_text
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
        hold_out=0.0 if cfg.eval_folder else cfg.eval_share,  # held_out_videos(cfg) kept out
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


def held_out_videos(cfg: TokenizerDataConfig) -> list[Path]:
    """The files of a folder ``cfg.source`` held out of training for evaluation: ``eval_share``
    of them (``held_out_files``), none with ``eval_folder`` set or for another kind of source."""
    if cfg.eval_folder or cfg.eval_share == 0 or source_kind(cfg.source) != "folder":
        return []
    root = Path(cfg.source)
    if not root.is_dir():
        raise ValueError(f"data.source {cfg.source} is not a folder; check the path")
    files = list_video_files(root, include_images=cfg.n_frames == 1)
    return held_out_files(files, root, cfg.eval_share)


HELD_OUT_FILE = "held_out.json"


def record_held_out(cfg: TokenizerDataConfig, out: Path) -> None:
    """List the videos :func:`held_out_videos` keeps out in ``out/held_out.json``, warning when
    a resumed run's list differs (files added to the folder can move one it trained on into
    it). Nothing for other sources."""
    if cfg.eval_folder or source_kind(cfg.source) != "folder":
        return
    root = Path(cfg.source)
    now = [p.relative_to(root).as_posix() for p in held_out_videos(cfg)]
    path = out / HELD_OUT_FILE
    before = json.loads(path.read_text())["files"] if path.is_file() else now
    if before != now:
        log.warning(
            "the held-out videos of %s changed since this run began (files added or removed): "
            "%s now, %s before; its evaluation may now read videos it trained on",
            cfg.source,
            now,
            before,
        )
    atomic_write_text(path, json.dumps({"source": cfg.source, "files": now}, indent=2) + "\n")


def evaluation_source(cfg: TokenizerDataConfig) -> tuple[str, bool]:
    """What :func:`held_out_clips` reads, in words, and whether training never sees it."""
    if cfg.eval_folder:
        if Path(cfg.eval_folder).resolve() == Path(cfg.source).resolve():
            return f"the training videos of {cfg.source} (data.eval_folder), not held out", False
        return f"held-out videos of {cfg.eval_folder}", True
    if source_kind(cfg.source) == "shapes":
        return "held-out shapes-world clips", True
    held = held_out_videos(cfg)
    if held:
        files = len(list_video_files(cfg.source, include_images=cfg.n_frames == 1))
        share = f"data.eval_share = {cfg.eval_share}"
        return f"held-out videos of {cfg.source}: {len(held)} of its {files} files ({share})", True
    return f"the first training clips of {cfg.source}, not held out", False


def held_out_clips(cfg: TokenizerDataConfig, n: int) -> torch.Tensor:
    """``n`` evaluation clips ``(n, C, T, H, W)`` (fewer if the videos hold fewer), in a fixed
    order: the first clips of ``cfg.eval_folder``; else unseen shapes seeds, the videos of a
    folder ``cfg.source`` that :func:`held_out_videos` keeps out of training, or, where
    nothing is held out (a folder of few videos, ``eval_share`` 0, tar shards), the source's
    first training clips (:func:`evaluation_source` says which)."""
    source = cfg.eval_folder or cfg.source
    kind = source_kind(source)
    if kind == "shapes":
        world = shapes_world(cfg, held_out=True)
        return torch.stack([world[i][1] for i in range(n)])
    clip = {"n_frames": cfg.n_frames, "size": cfg.size, "fps": cfg.fps}
    if kind == "shards":
        from loong.data.webdataset import WebVideoDataset

        shards = WebVideoDataset(source, **clip, shuffle=False, rank=0, world_size=1)
        clips = [sample["video"] for _, sample in zip(range(n), shards, strict=False)]
        summary = shards.summary()
    else:
        held = bool(held_out_videos(cfg))
        share = cfg.eval_share if held else 0.0
        folder = VideoFolder(source, **clip, shuffle=False, hold_out=share, held_out=held)
        clips = [clip for _, clip in zip(range(n), folder, strict=False)]
        summary = folder.summary()
    if not clips:
        what, _ = evaluation_source(cfg)
        raise ValueError(
            f"{source} yields no evaluation clips of {cfg.n_frames} frames from {what}: {summary}"
        )
    return torch.stack(clips)
