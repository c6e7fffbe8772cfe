"""WebDataset tar shards as a source of token shards (``loong lm tokenize`` on ``.tar`` files).

Each tar file is one unit of work (:mod:`loong.data.shards`): its samples are read in order, their
videos decoded, cut into clips and tokenized into the unit's token shards. Under torchrun the tar
files are dealt out to the ranks like any units. Captions come from each sample's ``.txt`` (first
non-empty line; further lines are alternates) or ``.json`` (a string, or ``{"caption": ...,
"alternates": [...]}``); images are one-frame items (t = 1), as in folders. A sample without a
caption, one that does not decode, one too short for a clip, and a damaged tar file (the samples
before the damage are kept) are skipped, counted and named in ``meta.json``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loong.data.shards import (
    _base_meta,
    _check_clip_shape,
    _clip_items,
    _Item,
    _Skip,
    _Unit,
    _write_shards,
)
from loong.data.sources import shard_files
from loong.data.video import PathLike, VideoReadError
from loong.data.webdataset import (
    IMAGE_EXTENSIONS,
    media_extension,
    read_sample_video,
    read_tar,
    sample_captions,
)
from loong.video_tokenizer.model import VideoTokenizer


def tokenize_webdataset(
    video_tokenizer: VideoTokenizer,
    shards: PathLike,
    out_dir: PathLike,
    *,
    n_frames: int = 17,
    size: int = 64,
    fps: float = 8.0,
    clips_per_video: int | None = 1,
    batch_size: int = 16,
    video_tokenizer_dir: PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize every sample of the tar ``shards`` (a ``.tar`` file, a brace pattern or a folder
    of ``.tar`` files: :func:`loong.data.sources.shard_files`) into token shards in ``out_dir``;
    returns meta. Clips as in :func:`loong.data.shards.tokenize_folder`; a sample's ``source`` in
    the shards is ``<tar file name>:<key>#<clip>``."""
    _check_clip_shape(video_tokenizer, n_frames, size)
    tars = [path.resolve() for path in shard_files(shards)]
    max_frames = None if not clips_per_video else clips_per_video * n_frames

    def items(tar: Path) -> Iterator[_Item | _Skip]:
        damage: list[str] = []

        def on_damage(exn: Exception) -> bool:
            damage.append(f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
            return True

        with tempfile.TemporaryDirectory(prefix="loong-tokenize-") as tmp:
            for sample in read_tar(tar, on_damage):
                name = f"{tar.name}:{sample['__key__']}"
                try:
                    texts = sample_captions(sample)
                except ValueError as e:
                    yield _Skip("no_caption", name, str(e))
                    continue
                if not texts:
                    yield _Skip("no_caption", name, "no caption (.txt or .json in the sample)")
                    continue
                try:
                    frames = read_sample_video(sample, Path(tmp), fps=fps, max_frames=max_frames)
                except (VideoReadError, OSError) as e:
                    yield _Skip("unreadable", name, str(e))
                    continue
                image = media_extension(sample) in IMAGE_EXTENSIONS
                yield from _clip_items(
                    name, texts, frames, image=image, n_frames=n_frames, size=size
                )
        if damage:
            reasons = "; ".join(dict.fromkeys(damage))
            yield _Skip("unreadable", tar.name, f"damaged shard, samples past it lost: {reasons}")

    units = [
        _Unit(key={"tar": str(tar)}, size=None, items=lambda tar=tar: items(tar)) for tar in tars
    ]
    source = str(Path(shards).resolve())  # a folder, a tar file or a pattern
    params = {
        "webdataset": source,
        "n_frames": n_frames,
        "size": size,
        "fps": fps,
        "clips_per_video": clips_per_video or 0,
    }
    meta = _base_meta(
        video_tokenizer,
        video_tokenizer_dir,
        source=source,
        params=params,
        n_frames=n_frames,
        size=size,
        fps=fps,
    )
    return _write_shards(
        video_tokenizer, Path(out_dir), units, meta, batch_size=batch_size, progress=progress
    )
