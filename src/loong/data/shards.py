"""Token shards: videos tokenized once by the video tokenizer, read memory-mapped by LM training.

Encoding video is the expensive part of a language-model step, and it gives the same indices every
epoch, so it happens once, here (DESIGN.md, "Scale"). On-disk format of a shards directory::

    meta.json                   what the shards hold (below); "complete": false while writing
    shard_00000_t005.npy        video indices (N, t, h, w), uint16 (int32 above 65,536 codes)
    shard_00000_t005.jsonl      N lines {"caption": str, "alternates": [str, ...], "source": str}
    shard_00000_t001.npy/.jsonl the same unit's one-frame items (images and stills, t = 1)
    shard_00000.json            unit manifest: the unit's source range and shards, written last
    tokenizer.json              optional: a byte-level BPE text tokenizer trained on the captions
    eval/                       a folder's held-out files, a shards directory of its own

``meta.json`` holds ``format``/``version``, ``source``, ``params`` (the settings that decide the
content), ``video_tokenizer`` (``path``, ``vocab_size``, ``fingerprint`` = sha256 of its weights,
compressions), ``grid`` (h, w), ``size``, ``fps``, ``n_frames``, ``index_dtype``, ``counts``
(items per t), ``shards`` (name, t, count), ``skipped`` (counts and reasons) and, when trained,
``text_tokenizer`` (file, vocab size, sha256).

Choices:

- Captions are stored as text, not ids: the shards stay independent of the text tokenizer, and
  caption dropout and the choice among alternate wordings happen at training time. Text is tiny
  next to the indices, so each ``.jsonl`` is read whole; the ``.npy`` files are memory-mapped.
- Shards are grouped by latent length t (images and stills are one-frame videos, t = 1), so a
  batch drawn from one group needs no video padding.
- Work is split into units of ``shard_size`` source items (shapes-world clips, or files of a
  folder); a unit writes one shard per t it produces (each file atomically: temporary file +
  ``os.replace``), then its manifest. A rerun skips every unit whose manifest matches its planned
  source range, so an interrupted run resumes where it stopped, and a larger ``n_clips`` only adds
  units. Settings that change the content (``params``, the video tokenizer's weights) must match
  the directory's ``meta.json``, or the run stops with a ValueError.
- Under torchrun, rank r of R tokenizes units r, r + R, r + 2R, ...: every unit once, each rank
  writing its own units' files. Files are named by unit, not by rank, so the directory is the
  same whatever the number of ranks (and a rerun may use another number). After a barrier, rank
  0 merges the unit manifests into ``meta.json`` (shards, counts, skipped files) and trains the
  text tokenizer.
- Folders: captions come from a JSONL file of ``{"file": <path relative to the folder>,
  "caption": str, "alternates": [str, ...] (optional)}``, or else from a sidecar ``<name>.txt``
  next to each file (first non-empty line = caption, further lines = alternates). Files with no
  caption, unreadable files and videos shorter than one clip are skipped, counted and listed in
  ``meta.json``; they never stop the run.
- WebDataset tar shards (``loong.data.tokenize_webdataset``): one unit per tar file; captions
  come from each sample's ``.txt`` or ``.json``; bad samples are skipped and counted the same way.

Axes: T frames, H W pixels, t h w latent grid, N items.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from loong.data.shapes import ShapesWorld, ShapesWorldConfig, caption, paraphrase
from loong.data.sources import source_kind
from loong.data.video import (
    HOLD_OUT_MIN_FILES,
    IMAGE_SUFFIXES,
    VideoReadError,
    cut_clips,
    frames_to_tensor,
    held_out_files,
    list_video_files,
    read_video,
    resize_video,
)
from loong.pretrained import atomic_write_text
from loong.text_tokenizer import TOKENIZER_FILE, TextTokenizer
from loong.train.dist import barrier, broadcast_object, init_distributed, is_distributed
from loong.train.dist import rank as current_rank
from loong.train.dist import world_size as current_world_size
from loong.video_tokenizer.model import VideoTokenizer

log = logging.getLogger("loong")

FORMAT, VERSION = "loong-token-shards", 1
META_FILE = "meta.json"
EVAL_DIR = "eval"
"""The shards directory inside a folder's shards that holds its held-out files' items
(``TokenizeConfig.eval_share``)."""
MAX_LISTED_SKIPS = 1000
"""At most this many skipped files are named in meta.json (all are counted)."""


@dataclass(kw_only=True)
class TokenizeConfig:
    """What ``loong lm tokenize`` turns into token shards."""

    source: str = "shapes"
    """"shapes" for the shapes world; WebDataset tar shards: a ``.tar`` file, a brace pattern
    (``data/train-{000000..000009}.tar``) or a folder with ``.tar`` files directly in it; any
    other folder: videos and images, searched recursively (``loong.data.sources``)."""
    video_tokenizer: str = ""
    """Directory of the trained video tokenizer (config.json + model.safetensors)."""
    n_clips: int = 2000
    """Shapes world: items to tokenize (stills included)."""
    n_frames: int = 17
    """Frames per clip, 1 + 4k (17 → 5 latent frames)."""
    size: int = 64
    """Frames are centre-cropped and resized to size × size."""
    fps: float = 8.0
    """Frame rate clips are resampled to (folders) or labelled with (shapes world)."""
    seed: int = 0
    """Shapes world: item i is a pure function of (seed, i)."""
    still_share: float = 0.2
    """Shapes world: share of items that are one-frame stills with still captions (t = 1)."""
    paraphrase_prob: float = 0.0
    """Shapes world: share of items whose main caption is a paraphrase, not the canonical one."""
    n_paraphrases: int = 2
    """Shapes world: extra paraphrases stored per item as alternates for training."""
    captions: str = ""
    """Folder: JSONL of {"file", "caption"[, "alternates"]}; empty: sidecar .txt files. Tar
    shards carry their captions in each sample's ``.txt`` or ``.json``."""
    clips_per_video: int = 1
    """Folder or tar shards: back-to-back clips kept from the start of each video; 0 keeps all."""
    eval_share: float = 0.05
    """Folder: the share of its files tokenized into ``OUT/eval`` (``EVAL_DIR``, a shards
    directory of its own) instead of ``OUT``, for ``loong lm train`` to evaluate on (it does when
    ``data.eval_shards`` is empty); picked by a hash of each file's path
    (``loong.data.video.held_out_files``: at least one from 10 files on, none from fewer). 0:
    none."""
    batch_size: int = 16
    """Clips encoded at once."""
    shard_size: int = 256
    """Source items (shapes-world clips or folder files) per unit of work and shard; tar shards
    are one unit each."""
    text_vocab_size: int = 2048
    """Train a BPE text tokenizer of this size on the captions into tokenizer.json; 0: don't."""
    device: str = "cpu"
    """Device the video tokenizer runs on."""

    def __post_init__(self) -> None:
        if self.n_clips < 1 or self.batch_size < 1 or self.shard_size < 1:
            raise ValueError(
                f"n_clips, batch_size and shard_size must be >= 1, got {self.n_clips}, "
                f"{self.batch_size}, {self.shard_size}"
            )
        if not 0.0 <= self.eval_share < 1.0:
            raise ValueError(f"eval_share must be in [0, 1) (0: none), got {self.eval_share}")
        if self.clips_per_video < 0 or self.n_paraphrases < 0:
            raise ValueError("clips_per_video and n_paraphrases must be >= 0")
        for name in ("still_share", "paraphrase_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.text_vocab_size and self.text_vocab_size < 256:
            raise ValueError(
                f"text_vocab_size must be 0 (no text tokenizer) or >= 256, got "
                f"{self.text_vocab_size}"
            )


# --- writing ---------------------------------------------------------------------------------


@dataclass
class _Item:
    caption: str
    alternates: list[str]
    frames: np.ndarray  # uint8 (T, H, W, 3)
    source: str
    first: bool = True  # the first clip of its source item (counts once on the progress bar)


@dataclass
class _Skip:
    kind: str  # "unreadable" | "no_caption" | "too_short"
    path: str
    reason: str


@dataclass
class _Unit:
    key: dict[str, Any]  # the unit's source range, compared on resume
    size: int | None  # source items, for the progress bar (None: not known before reading)
    items: Any  # () -> Iterator[_Item | _Skip]


@dataclass
class _Summary:
    shards: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(
        default_factory=lambda: {"unreadable": 0, "no_caption": 0, "too_short": 0}
    )
    skipped_files: dict[str, str] = field(default_factory=dict)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as f:
        tmp = f.name
        np.save(f, array)
    os.replace(tmp, path)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the state dict's names and bytes: identifies the weights that made the shards."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _check_clip_shape(video_tokenizer: VideoTokenizer, n_frames: int, size: int) -> None:
    r, s = video_tokenizer.config.temporal_compression, video_tokenizer.config.spatial_compression
    if n_frames < 1 or (n_frames - 1) % r:
        lo = max(1, n_frames - (n_frames - 1) % r)
        raise ValueError(f"n_frames must be 1+{r}k, got {n_frames}: pass {lo} or {lo + r}")
    if size < s or size % s:
        raise ValueError(f"size must be a multiple of {s} (the tokenizer's stride), got {size}")


def _write_shards(
    video_tokenizer: VideoTokenizer,
    out_dir: Path,
    units: list[_Unit],
    meta: dict[str, Any],
    *,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    """Tokenize every unit not already done, then write the final ``meta.json``; returns it.

    Every rank calls it (see the module docstring): each tokenizes its units, and after a barrier
    rank 0 writes ``meta.json``, which every rank returns.
    """
    rank, world_size = current_rank(), current_world_size()
    out_dir.mkdir(parents=True, exist_ok=True)
    meta_path = out_dir / META_FILE
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        before, now = old.get("params", {}), meta["params"]
        changed = {k: (before.get(k), now.get(k)) for k in {*before, *now}}
        changed = {k: v for k, v in changed.items() if v[0] != v[1]}
        # The tokenizer's path may move; its weights must not change.
        if (
            old.get("video_tokenizer", {}).get("fingerprint")
            != meta["video_tokenizer"]["fingerprint"]
        ):
            changed["video_tokenizer weights"] = ("before", "different now")
        if changed:
            raise ValueError(
                f"{out_dir} holds shards made with other settings (was, now): {changed}; "
                f"use a new directory, or the settings it was made with"
            )
    if rank == 0:  # every rank has checked the old meta.json above; they read the same file
        atomic_write_text(meta_path, json.dumps({**meta, "complete": False}, indent=2) + "\n")
    dtype = np.uint16 if video_tokenizer.config.vocab_size <= 2**16 else np.int32
    mine = list(enumerate(units))[rank::world_size]
    sizes = [unit.size for _, unit in mine]
    total = None if None in sizes else sum(sizes)
    bar = tqdm(total=total, disable=not progress or rank != 0, desc="tokenize", unit="item")
    for k, unit in mine:
        manifest_path = out_dir / f"shard_{k:05d}.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest["key"] == unit.key:  # done by an earlier run
                bar.update(unit.size or 0)
                continue
            manifest_path.unlink()
        for stale in out_dir.glob(f"shard_{k:05d}_t*"):
            stale.unlink()

        indices, records, skips = _encode_unit(
            video_tokenizer, unit.items(), batch_size=batch_size, dtype=dtype, bar=bar
        )
        shards = []
        for t in sorted(indices):
            name = f"shard_{k:05d}_t{t:03d}"
            array = np.concatenate(indices[t])  # (N, t, h, w)
            _atomic_save_npy(out_dir / f"{name}.npy", array)
            atomic_write_text(out_dir / f"{name}.jsonl", "\n".join(records[t]) + "\n")
            shards.append({"name": name, "t": t, "count": len(array)})
        manifest = {"key": unit.key, "shards": shards, "skipped": skips}
        atomic_write_text(manifest_path, json.dumps(manifest) + "\n")
    bar.close()
    barrier()  # every rank's units are done
    if rank == 0:
        meta = _finish_meta(out_dir, units, meta, dtype)
    return broadcast_object(meta)  # sent once meta.json is written


def _finish_meta(
    out_dir: Path, units: list[_Unit], meta: dict[str, Any], dtype: type
) -> dict[str, Any]:
    """Merge the manifests of ``units`` (all written) into the final ``meta.json``; return it."""
    summary = _Summary()
    for k, unit in enumerate(units):
        manifest = json.loads((out_dir / f"shard_{k:05d}.json").read_text())
        assert manifest["key"] == unit.key, f"unit {k} of {out_dir} was not tokenized"
        _add_unit(summary, manifest)
    counts: dict[str, int] = {}
    for s in summary.shards:
        counts[str(s["t"])] = counts.get(str(s["t"]), 0) + s["count"]
    meta = {
        **meta,
        "complete": True,
        "index_dtype": np.dtype(dtype).name,
        "n_items": sum(counts.values()),
        "counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
        "shards": summary.shards,
        "skipped": {**summary.skipped, "files": summary.skipped_files},
    }
    atomic_write_text(out_dir / META_FILE, json.dumps(meta, indent=2) + "\n")
    n_skipped = sum(summary.skipped.values())
    log.info(
        "token shards in %s: %d items %s; skipped %d (%s)",
        out_dir,
        meta["n_items"],
        {int(t): n for t, n in counts.items()},
        n_skipped,
        ", ".join(f"{n} {kind}" for kind, n in summary.skipped.items()),
    )
    return meta


def _encode_unit(
    video_tokenizer: VideoTokenizer,
    entries: Iterable[_Item | _Skip],
    *,
    batch_size: int,
    dtype: type,
    bar: tqdm,
) -> tuple[dict[int, list[np.ndarray]], dict[int, list[str]], list[dict[str, str]]]:
    """One unit's entries → indices ``(B, t, h, w)`` batches and JSON caption lines, by t; skips.

    Clips are batched by frame count, so each batch stacks into one tensor.
    """
    device = next(video_tokenizer.parameters()).device
    pending: dict[int, list[_Item]] = {}
    indices: dict[int, list[np.ndarray]] = {}
    records: dict[int, list[str]] = {}
    skips: list[dict[str, str]] = []

    def flush(n_frames: int) -> None:
        items = pending.pop(n_frames)
        video = torch.stack([frames_to_tensor(it.frames) for it in items])  # (B, C, T, H, W)
        out = video_tokenizer.encode(video.to(device)).cpu().numpy().astype(dtype)  # (B, t, h, w)
        indices.setdefault(out.shape[1], []).append(out)
        records.setdefault(out.shape[1], []).extend(
            json.dumps({"caption": it.caption, "alternates": it.alternates, "source": it.source})
            for it in items
        )

    for entry in entries:
        if isinstance(entry, _Skip):
            skips.append({"kind": entry.kind, "path": entry.path, "reason": entry.reason})
            bar.update(1)
            continue
        if entry.first:
            bar.update(1)
        group = pending.setdefault(len(entry.frames), [])
        group.append(entry)
        if len(group) == batch_size:
            flush(len(entry.frames))
    for n_frames in list(pending):
        flush(n_frames)
    return indices, records, skips


def _add_unit(summary: _Summary, manifest: dict[str, Any]) -> None:
    summary.shards.extend(manifest["shards"])
    for skip in manifest["skipped"]:
        summary.skipped[skip["kind"]] += 1
        if len(summary.skipped_files) < MAX_LISTED_SKIPS:
            summary.skipped_files[skip["path"]] = f"{skip['kind']}: {skip['reason']}"


def _base_meta(
    video_tokenizer: VideoTokenizer,
    video_tokenizer_dir: str | Path | None,
    *,
    source: str,
    params: dict[str, Any],
    n_frames: int,
    size: int,
    fps: float,
) -> dict[str, Any]:
    cfg = video_tokenizer.config
    s = cfg.spatial_compression
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "params": params,
        "video_tokenizer": {
            "path": str(Path(video_tokenizer_dir).resolve()) if video_tokenizer_dir else None,
            "vocab_size": cfg.vocab_size,
            "fingerprint": model_fingerprint(video_tokenizer),
            "spatial_compression": s,
            "temporal_compression": cfg.temporal_compression,
        },
        "grid": [size // s, size // s],
        "size": size,
        "fps": fps,
        "n_frames": n_frames,
    }


def tokenize_shapes_world(
    video_tokenizer: VideoTokenizer,
    out_dir: str | Path,
    *,
    n_clips: int,
    n_frames: int = 17,
    size: int = 64,
    fps: float = 8.0,
    seed: int = 0,
    still_share: float = 0.2,
    paraphrase_prob: float = 0.0,
    n_paraphrases: int = 2,
    batch_size: int = 16,
    shard_size: int = 256,
    video_tokenizer_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize shapes-world items ``0 .. n_clips − 1`` into shards in ``out_dir``; returns meta.

    Item i is ``ShapesWorld`` item i (stills with probability ``still_share`` go to t = 1
    shards). Its alternates are the canonical caption (when the main one is a paraphrase) and
    ``n_paraphrases`` paraphrases seeded by (seed, i). ``video_tokenizer_dir`` is recorded in
    ``meta.json`` so generation knows which tokenizer decodes the LM's tokens.
    """
    _check_clip_shape(video_tokenizer, n_frames, size)
    world = ShapesWorld(
        ShapesWorldConfig(
            height=size,
            width=size,
            fps=fps,
            n_frames=n_frames,
            paraphrase_prob=paraphrase_prob,
            still_prob=still_share,
            seed=seed,
        )
    )

    def items(start: int, stop: int) -> Iterator[_Item]:
        for i in range(start, stop):
            scene, _, text, frames = world.sample(i)
            rng = np.random.default_rng([seed, i, 1])
            wordings = [caption(scene)] + [paraphrase(scene, rng) for _ in range(n_paraphrases)]
            alternates = list(dict.fromkeys(w for w in wordings if w != text))
            yield _Item(caption=text, alternates=alternates, frames=frames, source=f"shapes:{i}")

    units = [
        _Unit(
            key={"start": a, "stop": min(a + shard_size, n_clips)},
            size=min(a + shard_size, n_clips) - a,
            items=lambda a=a: items(a, min(a + shard_size, n_clips)),
        )
        for a in range(0, n_clips, shard_size)
    ]
    params = {
        "n_frames": n_frames,
        "size": size,
        "fps": fps,
        "seed": seed,
        "still_share": still_share,
        "paraphrase_prob": paraphrase_prob,
        "n_paraphrases": n_paraphrases,
        "shard_size": shard_size,
    }
    meta = _base_meta(
        video_tokenizer,
        video_tokenizer_dir,
        source="shapes",
        params=params,
        n_frames=n_frames,
        size=size,
        fps=fps,
    )
    return _write_shards(
        video_tokenizer, Path(out_dir), units, meta, batch_size=batch_size, progress=progress
    )


def read_captions(folder: Path, captions: str | Path | None) -> dict[str, list[str]] | None:
    """JSONL captions → {path relative to ``folder`` (posix): [caption, *alternates]}.

    None when ``captions`` is not given (sidecar ``.txt`` files are used then). A malformed line
    is a ValueError naming it: the caption file is the user's input, not a data file to skip.
    """
    if not captions:
        return None
    path = Path(captions)
    if not path.is_file():
        raise FileNotFoundError(f"captions file {path} does not exist")
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file, text = row["file"], row["caption"]
            alternates = list(row.get("alternates", []))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f'{path}:{n}: expected {{"file": ..., "caption": ...}}, got {line!r} ({e})'
            ) from None
        file_path = Path(file)
        if file_path.is_absolute():
            file_path = file_path.relative_to(folder.resolve())
        out[file_path.as_posix()] = [str(text), *map(str, alternates)]
    return out


def _sidecar_captions(path: Path) -> list[str]:
    txt = path.with_suffix(".txt")
    if not txt.is_file():
        return []
    return [line.strip() for line in txt.read_text().splitlines() if line.strip()]


def _clip_items(
    source: str, texts: list[str], frames: np.ndarray, *, image: bool, n_frames: int, size: int
) -> Iterator[_Item | _Skip]:
    """One decoded file's items: back-to-back clips of ``n_frames`` (an image: its one frame),
    resized to ``size``, captioned by ``texts`` (main wording first); a skip when too short."""
    clips = [frames[:1]] if image else cut_clips(frames, n_frames)
    if not clips:
        yield _Skip("too_short", source, f"{len(frames)} frames < one clip of {n_frames}")
    for j, clip in enumerate(clips):
        yield _Item(
            caption=texts[0],
            alternates=texts[1:],
            frames=resize_video(clip, size),
            source=f"{source}#{j}",
            first=j == 0,
        )


def tokenize_folder(
    video_tokenizer: VideoTokenizer,
    folder: str | Path,
    out_dir: str | Path,
    *,
    captions: str | Path | None = None,
    n_frames: int = 17,
    size: int = 64,
    fps: float = 8.0,
    clips_per_video: int | None = 1,
    batch_size: int = 16,
    shard_size: int = 256,
    video_tokenizer_dir: str | Path | None = None,
    progress: bool = True,
    hold_out: float = 0.0,
    held_out: bool = False,
) -> dict[str, Any]:
    """Tokenize every video and image under ``folder`` into shards in ``out_dir``; returns meta.

    Videos are resampled to ``fps``, centre-cropped and resized to ``size``, and cut into
    back-to-back clips of ``n_frames`` (the first ``clips_per_video``; None keeps all); images
    become one-frame items (t = 1). Captions: see the module docstring. Skipped files are counted
    in ``meta["skipped"]`` and named in ``meta["skipped"]["files"]``. ``hold_out`` = s > 0
    leaves out the files ``held_out_files`` picks at share s (``held_out=True``: takes only
    those), as ``VideoFolder`` does.
    """
    _check_clip_shape(video_tokenizer, n_frames, size)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of videos; check the path")
    table = read_captions(folder, captions)
    files = list_video_files(folder, include_images=True)
    if not files:
        raise ValueError(f"{folder} holds no video or image files to tokenize")
    held = set(held_out_files(files, folder, hold_out))
    if held_out and not held:
        raise ValueError(
            f"{folder} holds out no files at the share {hold_out} ({len(files)} files; "
            f"{HOLD_OUT_MIN_FILES} or more hold out at least one)"
        )
    if hold_out > 0:
        files = [p for p in files if (p in held) == held_out]
    max_frames = None if not clips_per_video else clips_per_video * n_frames

    def items(chunk: list[Path]) -> Iterator[_Item | _Skip]:
        for path in chunk:
            rel = path.relative_to(folder).as_posix()
            texts = table.get(rel, []) if table is not None else _sidecar_captions(path)
            if not texts:
                where = "in the captions file" if table is not None else f"{path.stem}.txt"
                yield _Skip("no_caption", rel, f"no caption ({where})")
                continue
            try:
                frames, _ = read_video(path, fps=fps, max_frames=max_frames)
            except (VideoReadError, OSError) as e:
                yield _Skip("unreadable", rel, str(e))
                continue
            image = path.suffix.lower() in IMAGE_SUFFIXES
            yield from _clip_items(rel, texts, frames, image=image, n_frames=n_frames, size=size)

    units = []
    for a in range(0, len(files), shard_size):
        chunk = files[a : a + shard_size]
        key = {"files": [p.relative_to(folder).as_posix() for p in chunk]}
        units.append(_Unit(key=key, size=len(chunk), items=lambda chunk=chunk: items(chunk)))
    params = {
        "folder": str(folder.resolve()),
        "captions": str(Path(captions).resolve()) if captions else "",
        "n_frames": n_frames,
        "size": size,
        "fps": fps,
        "clips_per_video": clips_per_video or 0,
        "shard_size": shard_size,
    }
    if hold_out > 0:  # absent otherwise, so that shards written before the option still match
        params |= {"eval_share": hold_out, "held_out": held_out}
    meta = _base_meta(
        video_tokenizer,
        video_tokenizer_dir,
        source=str(folder.resolve()),
        params=params,
        n_frames=n_frames,
        size=size,
        fps=fps,
    )
    return _write_shards(
        video_tokenizer, Path(out_dir), units, meta, batch_size=batch_size, progress=progress
    )


def train_text_tokenizer(shards: Iterable[TokenShards], vocab_size: int) -> TextTokenizer:
    """Byte-level BPE of ``vocab_size`` trained on every caption and alternate of ``shards``."""
    texts = [text for s in shards for text in s.texts()]
    if not texts:
        raise ValueError("the shards hold no captions to train a text tokenizer on")
    return TextTokenizer.train(texts, vocab_size)


def tokenize_dataset(cfg: TokenizeConfig, out_dir: str | Path, *, progress: bool = True) -> Path:
    """``loong lm tokenize``: shards of ``cfg.source`` (+ ``tokenizer.json``) in ``out_dir``.

    Under torchrun every rank calls it (it joins the process group): each tokenizes its share of
    the units, rank 0 writes ``meta.json`` and the text tokenizer (see the module docstring).
    """
    if not cfg.video_tokenizer:
        raise ValueError("set video_tokenizer to a trained video tokenizer's directory")
    kind = source_kind(cfg.source)
    if kind == "shards" and cfg.captions:
        raise ValueError(
            "captions is for folders of videos: tar shards carry each sample's caption in its "
            ".txt or .json; leave captions empty"
        )
    device = torch.device(cfg.device)
    if "WORLD_SIZE" in os.environ or is_distributed():
        # The last rank to finish may keep the others at a barrier for hours: a day's timeout.
        device = init_distributed(cfg.device.split(":")[0], timeout_s=24 * 3600.0)
    out = Path(out_dir)
    old_meta = json.loads((out / META_FILE).read_text()) if (out / META_FILE).is_file() else {}
    model = VideoTokenizer.from_pretrained(cfg.video_tokenizer, device=device)
    common = {
        "n_frames": cfg.n_frames,
        "size": cfg.size,
        "fps": cfg.fps,
        "batch_size": cfg.batch_size,
        "shard_size": cfg.shard_size,
        "video_tokenizer_dir": cfg.video_tokenizer,
        "progress": progress,
    }
    if kind == "shapes":
        meta = tokenize_shapes_world(
            model,
            out,
            n_clips=cfg.n_clips,
            seed=cfg.seed,
            still_share=cfg.still_share,
            paraphrase_prob=cfg.paraphrase_prob,
            n_paraphrases=cfg.n_paraphrases,
            **common,
        )
    elif kind == "shards":
        from loong.data.tokenize_webdataset import tokenize_webdataset

        del common["shard_size"]  # one unit per tar file
        meta = tokenize_webdataset(
            model,
            cfg.source,
            out,
            clips_per_video=cfg.clips_per_video or None,
            **common,
        )
    else:
        folder = {"captions": cfg.captions or None, "clips_per_video": cfg.clips_per_video or None}
        share = cfg.eval_share
        if not held_out_files(list_video_files(cfg.source), Path(cfg.source), share):
            share = 0.0  # too few files: none held out, and no eval directory
        # the training shards first: a directory made with other settings stops the run there
        meta = tokenize_folder(model, cfg.source, out, **folder, hold_out=share, **common)
        if share > 0:
            held = {"hold_out": share, "held_out": True}
            tokenize_folder(model, cfg.source, out / EVAL_DIR, **folder, **held, **common)
    if cfg.text_vocab_size and current_rank() == 0:
        # Retrained only when the captions or the size changed, so a resumed run keeps its file.
        path = out / TOKENIZER_FILE
        shards = TokenShards(out)
        corpus = hashlib.sha256("\n".join(shards.texts()).encode()).hexdigest()
        wanted = {"requested_vocab_size": cfg.text_vocab_size, "corpus_sha256": corpus}
        old = old_meta.get("text_tokenizer", {})
        if not path.is_file() or any(old.get(k) != v for k, v in wanted.items()):
            train_text_tokenizer([shards], cfg.text_vocab_size).save(path)
        meta["text_tokenizer"] = {
            "file": TOKENIZER_FILE,
            **wanted,
            "vocab_size": TextTokenizer.load(path).vocab_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")
    barrier()  # the text tokenizer is written before any rank returns
    return out


# --- reading ---------------------------------------------------------------------------------


class TokenShards:
    """Read a shards directory: items ``(caption, indices LongTensor (t, h, w))``, grouped by t.

    Indices are memory-mapped (``np.load(mmap_mode="r")``); captions are held in memory. Items
    are numbered group by group (shortest t first), in shard order within a group; ``item(t, i)``
    addresses item i of group t.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.directory} holds no {META_FILE}: make token shards with `loong lm tokenize`"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a loong token-shards file")
        if not self.meta.get("complete"):
            raise ValueError(
                f"{self.directory} is incomplete (tokenizing was interrupted): run the same "
                f"`loong lm tokenize` again to finish it"
            )
        self.grid: tuple[int, int] = tuple(self.meta["grid"])
        self.fps: float = self.meta["fps"]
        self.video_vocab_size: int = self.meta["video_tokenizer"]["vocab_size"]
        self._arrays: dict[int, list[np.ndarray]] = {}
        self._records: dict[int, list[dict[str, Any]]] = {}
        for shard in self.meta["shards"]:
            t = shard["t"]
            array = np.load(self.directory / f"{shard['name']}.npy", mmap_mode="r")
            lines = (self.directory / f"{shard['name']}.jsonl").read_text().splitlines()
            if len(array) != shard["count"] or len(lines) != shard["count"]:
                raise ValueError(
                    f"shard {shard['name']} in {self.directory} is damaged ({len(array)} clips, "
                    f"{len(lines)} captions, meta says {shard['count']}): delete its unit "
                    f"manifest {shard['name'][:11]}.json and tokenize again"
                )
            self._arrays.setdefault(t, []).append(array)
            self._records.setdefault(t, []).extend(json.loads(line) for line in lines)
        self._offsets = {
            t: np.cumsum([0] + [len(a) for a in arrays]) for t, arrays in self._arrays.items()
        }
        self.lengths: tuple[int, ...] = tuple(sorted(t for t in self._records if self._records[t]))

    def __len__(self) -> int:
        return sum(len(r) for r in self._records.values())

    def count(self, t: int) -> int:
        """Items of latent length ``t`` (0 if none)."""
        return len(self._records.get(t, ()))

    def record(self, t: int, i: int) -> dict[str, Any]:
        """Item i of group t's text: ``{"caption", "alternates", "source"}``."""
        return self._records[t][i]

    def indices(self, t: int, i: int) -> torch.Tensor:
        """Item i of group t's video indices, int64 ``(t, h, w)``."""
        if not 0 <= i < self.count(t):
            raise IndexError(f"item {i} is outside group t={t} of {self.count(t)} items")
        shard = int(np.searchsorted(self._offsets[t], i, side="right")) - 1
        row = self._arrays[t][shard][i - self._offsets[t][shard]]  # (t, h, w)
        return torch.from_numpy(np.asarray(row, dtype=np.int64))

    def item(self, t: int, i: int) -> tuple[str, torch.Tensor]:
        """``(caption, indices (t, h, w))`` of item i of group t."""
        return self.record(t, i)["caption"], self.indices(t, i)

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside [0, {len(self)})")
        for t in self.lengths:
            if index < self.count(t):
                return self.item(t, index)
            index -= self.count(t)
        raise AssertionError("unreachable")

    def texts(self) -> Iterator[str]:
        """Every caption and alternate wording, for training the text tokenizer."""
        for records in self._records.values():
            for r in records:
                yield r["caption"]
                yield from r["alternates"]


def check_compatible(shards: Sequence[TokenShards]) -> None:
    """Raise ValueError unless ``shards`` share one latent grid and one video tokenizer."""
    first = shards[0]
    for s in shards[1:]:
        a, b = first.meta["video_tokenizer"], s.meta["video_tokenizer"]
        if s.grid != first.grid or a["fingerprint"] != b["fingerprint"]:
            raise ValueError(
                f"{s.directory} was made with another video tokenizer or size than "
                f"{first.directory} (grid {s.grid} vs {first.grid}); one LM needs one tokenizer"
            )
