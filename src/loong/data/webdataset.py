"""Videos with captions in WebDataset tar shards: pack a folder, read clips back on many ranks.

A shard is a plain tar file; its members are grouped into samples by key (the member name up to
its first dot, WebDataset's convention): ``a/clip_7.mp4`` and ``a/clip_7.txt`` are one sample.
A sample holds one video (any suffix in ``VIDEO_SUFFIXES``, or an image) and optionally a caption:
``.txt`` (the first non-empty line) or ``.json`` (a string, or ``{"caption": ...}``).
:func:`write_shards` packs a folder of videos with sidecar captions into such shards.

:class:`WebVideoDataset` reads them with the ``webdataset`` library (tar streaming and grouping by
key) and decodes videos with the project's PyAV helpers into clips. Every sample is read exactly
once per epoch across all ranks and DataLoader workers: with R ranks of W workers there are R·W
readers, and the shard order of the epoch (shuffled by ``seed + epoch``, the same everywhere) is
dealt out by :func:`plan_reads`:

- at least R·W shards: each reader reads every (R·W)-th shard (shard-level split, no wasted I/O);
- at least R shards: each rank takes every R-th shard and its workers read all of those, keeping
  every W-th sample each;
- fewer shards than ranks (by shards some rank would get none): every reader reads every shard
  and keeps every (R·W)-th sample. Both fallbacks are announced with a warning; write more
  shards (smaller ``samples_per_shard``) to avoid the extra reading.

With a shard-level split, readers may get a different number of samples: a loop should count
steps, not wait for every rank's data to run out. webdataset's own ``split_by_node`` and
``split_by_worker`` read the rank from the environment and split shards only, so the split here is
our own stage in front of its tar reader; ranks can also be given explicitly.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from loong.data.sources import shard_files
from loong.data.video import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    PathLike,
    VideoReadError,
    check_clip_settings,
    cut_clips,
    frames_to_tensor,
    list_video_files,
    read_video,
    resize_video,
)
from loong.train.dist import rank as current_rank
from loong.train.dist import world_size as current_world_size

try:
    import webdataset as wds
except ImportError as e:  # an optional dependency
    raise ImportError(
        "loong.data.webdataset needs the webdataset package: pip install 'loong-video[scale]'"
    ) from e

IMAGE_EXTENSIONS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)
MEDIA_EXTENSIONS = tuple(s.lstrip(".") for s in VIDEO_SUFFIXES) + IMAGE_EXTENSIONS


# --- who reads what --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadPlan:
    """One reader's share of an epoch: the shards it opens, in order, and which of their
    samples it keeps (the i-th sample it meets, counting from 0, when i % keep_every ==
    keep_offset)."""

    shards: tuple[int, ...]
    """Indices into the shard list, in reading order."""
    keep_every: int
    """1 for a shard-level split; the number of readers sharing these shards otherwise."""
    keep_offset: int
    """This reader's place among the readers sharing the shards."""
    note: str | None = None
    """Why the split is not by shard (None when it is)."""


def plan_reads(
    n_shards: int,
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> ReadPlan:
    """The shards and samples reader ``(rank, worker)`` reads in ``epoch``: over all
    ``world_size × num_workers`` readers, every sample exactly once (see the module docstring)."""
    if not 0 <= rank < world_size or not 0 <= worker < num_workers:
        raise ValueError(
            f"need 0 <= rank < world_size and 0 <= worker < num_workers, got rank {rank} of "
            f"{world_size}, worker {worker} of {num_workers}"
        )
    order = list(range(n_shards))
    if shuffle:
        random.Random(seed + epoch).shuffle(order)  # the same order on every reader
    readers = world_size * num_workers
    if n_shards >= readers:
        reader = rank * num_workers + worker
        return ReadPlan(tuple(order[reader::readers]), 1, 0)
    fix = f"write at least {readers} shards to split by shard"
    if n_shards >= world_size:
        note = (
            f"{n_shards} shards for {world_size} ranks × {num_workers} workers: each worker "
            f"reads all of its rank's shards and keeps every {num_workers}-th sample; {fix}"
        )
        return ReadPlan(tuple(order[rank::world_size]), num_workers, worker, note)
    note = (
        f"{n_shards} shards for {world_size} ranks: by shards, ranks {n_shards}.."
        f"{world_size - 1} would get none, so every reader reads all shards and keeps every "
        f"{readers}-th sample; {fix}"
    )
    return ReadPlan(tuple(order), readers, rank * num_workers + worker, note)


# --- reading ---------------------------------------------------------------------------------


def shard_paths(shards: PathLike | Sequence[PathLike]) -> list[Path]:
    """The tar files of a folder (its ``*.tar``, sorted), a ``.tar`` path or a brace pattern
    (:func:`loong.data.sources.shard_files`), or the given list of tar files."""
    if isinstance(shards, (str, os.PathLike)):
        return shard_files(shards)
    paths = [Path(p) for p in shards]
    if not paths:
        raise ValueError("no .tar shards given: write them with write_shards")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ValueError(f"shards not found: {', '.join(missing[:3])}; check the paths")
    return paths


class WebVideoDataset(IterableDataset[dict[str, Any]]):
    """Clips from WebDataset shards: ``{"video": (C, n_frames, size, size) float in [-1, 1],
    "caption": str ("" when the sample has none), "key": the sample's key}``.

    Each video is read (resampled to ``fps`` if given), centre-cropped and resized to ``size``,
    and cut into back-to-back clips (``clips_per_video`` keeps the first ones only). ``rank`` and
    ``world_size`` default to the running process group's. One pass per ``__iter__``; pass ``e``
    uses the shard order of epoch ``e`` (see :meth:`set_epoch`). Unreadable samples are skipped
    with a warning and recorded in ``skipped`` (key → reason), damaged shards in
    ``damaged_shards``; counters are per pass and per process (each worker keeps its own).
    """

    def __init__(
        self,
        shards: PathLike | Sequence[PathLike],
        *,
        n_frames: int,
        size: int,
        fps: float | None = None,
        clips_per_video: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        check_clip_settings(n_frames, size, fps, clips_per_video)
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither (to use the process group)")
        self.shards = shard_paths(shards)
        self.n_frames, self.size, self.fps = n_frames, size, fps
        self.clips_per_video, self.shuffle, self.seed = clips_per_video, shuffle, seed
        self.rank = current_rank() if rank is None else rank
        self.world_size = current_world_size() if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {self.rank} and {self.world_size}")
        self.epoch = 0
        self.current_shard = ""
        self.skipped: dict[str, str] = {}
        self.damaged_shards: dict[str, str] = {}
        self.n_read = self.n_clips = self.n_too_short = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the shard order of ``epoch`` (call it on every rank; without it
        each pass advances the epoch by one, also inside persistent DataLoader workers)."""
        self.epoch = epoch

    def plan(self) -> ReadPlan:
        """This process's share of the current epoch."""
        worker = get_worker_info()
        return plan_reads(
            len(self.shards),
            epoch=self.epoch,
            seed=self.seed,
            shuffle=self.shuffle,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker.id if worker is not None else 0,
            num_workers=worker.num_workers if worker is not None else 1,
        )

    def samples(self) -> Iterator[dict[str, Any]]:
        """This reader's raw samples of the current epoch (``{"__key__": ..., "mp4": bytes,
        ...}``), advancing the epoch; :meth:`__iter__` decodes them."""
        plan = self.plan()
        self.epoch += 1
        if plan.note is not None:
            warnings.warn(f"WebVideoDataset: {plan.note}", stacklevel=2)

        met = 0  # samples met so far in this pass, over all of the plan's shards
        for i in plan.shards:
            self.current_shard = str(self.shards[i])
            for sample in read_tar(self.shards[i], self._damaged_shard):
                if met % plan.keep_every == plan.keep_offset:
                    yield sample
                met += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.n_read = self.n_clips = self.n_too_short = 0
        max_frames = None if self.clips_per_video is None else self.clips_per_video * self.n_frames
        with tempfile.TemporaryDirectory(prefix="loong-wds-") as tmp:
            for sample in self.samples():
                key = f"{sample.get('__url__', '?')}:{sample['__key__']}"
                try:
                    caption = next(iter(sample_captions(sample)), "")
                    frames = read_sample_video(
                        sample, Path(tmp), fps=self.fps, max_frames=max_frames
                    )
                except ValueError as e:  # VideoReadError, or a malformed caption
                    self._skip(key, str(e))
                    continue
                self.n_read += 1
                n_used = len(frames) // self.n_frames * self.n_frames
                if n_used == 0:
                    self.n_too_short += 1
                    continue
                frames = resize_video(frames[:n_used], self.size)  # (T, size, size, 3)
                for clip in cut_clips(frames, self.n_frames):
                    self.n_clips += 1
                    video = frames_to_tensor(clip)  # (C, n_frames, size, size)
                    yield {"video": video, "caption": caption, "key": sample["__key__"]}

    def summary(self) -> str:
        """Counts of the last pass in this process, e.g. for logging after an epoch."""
        return (
            f"read {self.n_read} videos, {self.n_clips} clips; skipped {len(self.skipped)} bad "
            f"samples, {self.n_too_short} too short; {len(self.damaged_shards)} damaged shards"
        )

    def _skip(self, key: str, reason: str) -> None:
        self.skipped[key] = reason
        warnings.warn(
            f"WebVideoDataset: skipping {key}: {reason} ({len(self.skipped)} bad samples so far)",
            stacklevel=3,
        )

    def _damaged_shard(self, exn: Exception) -> bool:
        """webdataset's error handler: record the shard, warn, go on with the next one."""
        reason = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        self.damaged_shards[self.current_shard] = reason
        warnings.warn(
            f"WebVideoDataset: shard {self.current_shard} is damaged ({reason}); samples past "
            f"the damage are lost ({len(self.damaged_shards)} damaged shards so far)",
            stacklevel=2,
        )
        return True


def _ends_like_a_tar(path: Path) -> bool:
    """Whether ``path`` ends with the two zero blocks a tar writer puts after the last member."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < 1024:
            return False
        f.seek(size - 1024)
        return not any(f.read(1024))


def read_tar(
    path: Path, on_damage: Callable[[Exception], bool] | None = None
) -> Iterator[dict[str, Any]]:
    """The raw samples of one tar shard, in order (``{"__key__": ..., "mp4": bytes, ...}``).

    Damage ends the shard early: ``on_damage(error)`` is told (a truncated file, found by its
    missing end-of-archive marker, before the first sample) and the samples before it are kept;
    without ``on_damage`` the error is raised.
    """

    def damaged(exn: Exception) -> bool:
        if on_damage is None:
            raise exn
        return on_damage(exn)

    if not _ends_like_a_tar(path):  # tarfile stops quietly at a cut between members
        damaged(ValueError("truncated: no end-of-archive marker"))
    yield from wds.tarfile_samples([{"url": str(path)}], handler=damaged)


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """The sample's caption wordings, main one first; [] when it has none. From ``.txt``: its
    non-empty lines; from ``.json``: a string, or ``{"caption": str, "alternates": [str, ...]}``
    (alternates optional). A malformed ``.json`` is a ValueError naming the sample."""
    key = sample["__key__"]
    if "txt" in sample:
        lines = [line.strip() for line in sample["txt"].decode("utf-8", "replace").splitlines()]
        return [line for line in lines if line]
    if "json" in sample:
        try:
            value = json.loads(sample["json"])
            if isinstance(value, dict):
                texts = [value["caption"], *value.get("alternates", [])]
            else:
                texts = [value]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f'{key}.json: expected a string or {{"caption": ...}} ({e})') from e
        wrong = next((t for t in texts if not isinstance(t, str)), None)
        if wrong is not None:
            raise ValueError(f"{key}.json: a caption is {type(wrong).__name__}, not text")
        return [t.strip() for t in texts if t.strip()]
    return []


def media_extension(sample: dict[str, Any]) -> str | None:
    """The extension of the sample's video or image (``"mp4"``, ``"png"``, ...), or None."""
    return next((ext for ext in MEDIA_EXTENSIONS if ext in sample), None)


def read_sample_video(
    sample: dict[str, Any], tmp: Path, *, fps: float | None, max_frames: int | None
) -> np.ndarray:
    """Decode the sample's video (or image) bytes with :func:`read_video`, through a file in the
    folder ``tmp`` → uint8 ``(T, H, W, 3)``; a VideoReadError naming the sample otherwise."""
    extension = media_extension(sample)
    if extension is None:
        found = ", ".join(k for k in sample if not k.startswith("__")) or "nothing"
        raise VideoReadError(
            f"{sample['__key__']}: no video in the sample (found {found}); expected one of "
            f"{', '.join(MEDIA_EXTENSIONS)}"
        )
    path = tmp / f"sample.{extension}"  # PyAV picks the demuxer by name and content
    path.write_bytes(sample[extension])
    try:
        frames, _ = read_video(path, fps=fps, max_frames=max_frames)
    except VideoReadError as e:  # name the sample, not the temporary file
        raise VideoReadError(str(e).replace(str(path), f"{sample['__key__']}.{extension}")) from e
    return frames


# --- writing ---------------------------------------------------------------------------------


def write_shards(
    folder: PathLike,
    out_dir: PathLike,
    *,
    samples_per_shard: int = 1000,
    include_images: bool = True,
) -> list[Path]:
    """Pack every video (and image) under ``folder`` with its sidecar caption (same stem,
    ``.txt`` or ``.json``) into ``out_dir/shard-000000.tar``, ... ; return the shard paths.

    A sample's key is its path under ``folder`` without the suffix, dots turned into ``_`` (the
    first dot ends a WebDataset key). Each shard is written to a temporary file and renamed.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    folder, out = Path(folder), Path(out_dir)
    files = list_video_files(folder, include_images=include_images)
    if not files:
        raise ValueError(f"{folder} has no videos{' or images' if include_images else ''}")
    keys: dict[str, Path] = {}
    for path in files:
        key = path.relative_to(folder).with_suffix("").as_posix().replace(".", "_")
        if key in keys:
            raise ValueError(
                f"{keys[key]} and {path} both make the sample key {key!r}: rename one of them"
            )
        keys[key] = path
    out.mkdir(parents=True, exist_ok=True)
    items = list(keys.items())
    written = []
    for n, start in enumerate(range(0, len(items), samples_per_shard)):
        path = out / f"shard-{n:06d}.tar"
        tmp = out / f".shard-{n:06d}.tar.tmp"
        with wds.TarWriter(str(tmp), encoder=False, mtime=0) as writer:
            for key, video in items[start : start + samples_per_shard]:
                sample = {"__key__": key, video.suffix.lower().lstrip("."): video.read_bytes()}
                for extension in ("txt", "json"):
                    caption = video.with_suffix(f".{extension}")
                    if caption.is_file():
                        sample[extension] = caption.read_bytes()
                writer.write(sample)
        os.replace(tmp, path)
        written.append(path)
    return written
