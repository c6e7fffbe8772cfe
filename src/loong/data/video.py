"""Video file I/O: decode, resample in time, resize, cut clips, encode, and a folder dataset.

Built on PyAV, the maintained Python binding to FFmpeg's libraries: frames are decoded and encoded
in-process, with no ``ffmpeg`` subprocess, pipe parsing or extra binary to install.

Conventions: frames on disk and in numpy are uint8 ``(T, H, W, 3)`` RGB; the models see float
``(C, T, H, W)`` in [-1, 1] (:func:`frames_to_tensor`, :func:`tensor_to_frames`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import av
import numpy as np
import torch
import torch.nn.functional as F
from av.video.reformatter import VideoReformatter
from torch.utils.data import IterableDataset, get_worker_info

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
WRITE_SUFFIXES = (".mp4", ".gif")
T = TypeVar("T")

PathLike = str | os.PathLike[str]
HOLD_OUT_MIN_FILES = 10
"""The fewest files of a folder of which :func:`held_out_files` holds any out."""


class VideoReadError(ValueError):
    """A file that cannot be read as a video or image: missing, empty, corrupt, truncated or of an
    unsupported type. The message names the file and what to do about it."""


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise VideoReadError(f"{path}: no such file; check the path")
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
        raise VideoReadError(
            f"{path}: unsupported suffix {suffix!r}; convert it to one of "
            f"{', '.join(VIDEO_SUFFIXES + IMAGE_SUFFIXES)}"
        )
    if path.stat().st_size == 0:
        raise VideoReadError(f"{path}: file is empty (0 bytes); re-export or remove it")


def _decode(
    path: Path, *, max_frames: int | None = None, max_time: float | None = None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode the first video stream of ``path``, stopping after ``max_frames`` frames or once a
    frame lies more than ``max_time`` seconds after the first.

    Returns frames uint8 ``(T, H, W, 3)``, their times in seconds ``(T,)`` starting at 0, and the
    source frame rate.
    """
    _check_readable(path)
    frames: list[np.ndarray] = []
    times: list[float | None] = []
    # PyAV >= 18.1.1 converts frames through one swscale context a thread, kept for the thread's
    # life; a forked DataLoader worker inherits the parent's, whose slice threads it does not
    # have, and hangs in swscale on first use. So every call converts through a context of its
    # own (the same pixels as PyAV's). Inside a worker the decoder and the conversion run on one
    # thread: workers already run side by side, and none then starts a pool of FFmpeg threads.
    reformatter = VideoReformatter()
    threads = 1 if get_worker_info() is not None else 0  # 0: FFmpeg's own choice
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: has no video stream; pass a video or image file")
            stream = container.streams.video[0]
            if threads:
                stream.thread_count = threads
            rate = float(stream.average_rate or stream.guessed_rate or 0)
            for frame in container.decode(stream):
                rgb = reformatter.reformat(frame, format="rgb24", threads=threads)
                frames.append(rgb.to_ndarray())  # (H, W, 3)
                times.append(frame.time)
                if max_frames is not None and len(frames) >= max_frames:
                    break
                t, t0 = times[-1], times[0]
                if max_time is not None and t is not None and t0 is not None and t - t0 > max_time:
                    break
    except av.FFmpegError as e:
        raise VideoReadError(
            f"{path}: FFmpeg cannot decode it ({e}); the file is corrupt, truncated or not a "
            "video: re-encode it (e.g. `ffmpeg -i in out.mp4`) or remove it"
        ) from e
    if not frames:
        raise VideoReadError(f"{path}: no decodable frames; re-encode it or remove it")
    if len({f.shape for f in frames}) > 1:
        raise VideoReadError(f"{path}: frame size changes mid-stream; re-encode it at one size")
    if None in times:  # no timestamps: assume a constant rate
        if not rate:
            raise VideoReadError(f"{path}: no frame timestamps and no frame rate; re-encode it")
        times = [i / rate for i in range(len(frames))]
    stamps = np.asarray(times, dtype=np.float64)
    stamps -= stamps[0]
    if not rate:
        rate = (len(stamps) - 1) / stamps[-1] if stamps[-1] > 0 else 1.0
    return np.stack(frames), stamps, rate


def _nearest_indices(
    times: np.ndarray, src_fps: float, fps: float, max_frames: int | None
) -> np.ndarray:
    """Index of the source frame nearest each output time ``k / fps`` (ties go to the earlier
    frame), for as many outputs as fit in the source duration. ``times`` ``(T,)`` → ``(T',)``."""
    duration = times[-1] + 1.0 / src_fps  # the last frame lasts one source period
    n_out = max(1, int(np.ceil(duration * fps - 1e-6)))
    if max_frames is not None:
        n_out = min(n_out, max_frames)
    targets = np.arange(n_out) / fps
    hi = np.clip(np.searchsorted(times, targets), 0, len(times) - 1)
    lo = np.clip(hi - 1, 0, None)
    # The tolerance stops timestamp rounding (pts * time_base) from breaking exact ties at random.
    take_lo = np.abs(targets - times[lo]) <= np.abs(times[hi] - targets) + 1e-6
    return np.where(take_lo, lo, hi)


def read_image(path: PathLike) -> np.ndarray:
    """Read a still image (or a video's first frame) as RGB, uint8 ``(1, H, W, 3)``."""
    return _decode(Path(path), max_frames=1)[0]


def read_video(
    path: PathLike, *, fps: float | None = None, max_frames: int | None = None
) -> tuple[np.ndarray, float]:
    """Decode a video (or a still image, as one frame) to RGB frames.

    With ``fps`` set, frames are resampled in time to that rate by taking, for each output time
    ``k / fps``, the source frame with the nearest timestamp (this drops or repeats frames).
    ``max_frames`` caps the number of returned frames and stops decoding early.

    Returns frames uint8 ``(T, H, W, 3)`` and the frame rate of those frames: ``fps`` if given,
    else the source rate (1.0 for an image). Raises :class:`VideoReadError` for a missing, empty,
    corrupt, truncated or unsupported file, or one with no decodable frame.
    """
    path = Path(path)
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}: pass e.g. 8.0, or None to keep it")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}: pass None for all frames")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return read_image(path), float(fps) if fps is not None else 1.0
    if fps is None:
        frames, _, src_fps = _decode(path, max_frames=max_frames)
        return frames, src_fps
    # Enough frames to cover the last output time, plus the one after it to settle "nearest".
    max_time = None if max_frames is None else (max_frames - 1) / fps
    frames, times, src_fps = _decode(path, max_time=max_time)
    return frames[_nearest_indices(times, src_fps, fps, max_frames)], float(fps)


def _check_frames(frames: np.ndarray, rgb: bool = False) -> None:
    ok = isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
    if not ok or (rgb and frames.shape[3] != 3):
        got = f"{frames.dtype} {frames.shape}" if isinstance(frames, np.ndarray) else type(frames)
        raise ValueError(
            f"frames must be a uint8 numpy array (T, H, W, {3 if rgb else 'C'}), got {got}: "
            "use tensor_to_frames for model outputs"
        )


def resize_video(
    frames: np.ndarray, size: int | tuple[int, int], *, crop: bool = True
) -> np.ndarray:
    """Resize uint8 ``(T, H, W, C)`` to ``(T, H', W', C)`` with ``size`` = ``(H', W')`` or an int
    for a square. With ``crop`` the frames are first centre-cropped to the target aspect ratio
    (else they are stretched); resizing is bilinear with antialiasing, so downscaling does not
    alias."""
    _check_frames(frames)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size}: pass e.g. 256 or (256, 448)")
    n_frames, height, width, channels = frames.shape
    if crop:
        aspect = out_w / out_h
        if width > height * aspect:
            crop_w = max(1, round(height * aspect))
            x0 = (width - crop_w) // 2
            frames = frames[:, :, x0 : x0 + crop_w]
        else:
            crop_h = max(1, round(width / aspect))
            y0 = (height - crop_h) // 2
            frames = frames[:, y0 : y0 + crop_h]
    if n_frames == 0:
        return np.empty((0, out_h, out_w, channels), dtype=np.uint8)
    if frames.shape[1:3] == (out_h, out_w):
        return np.ascontiguousarray(frames)
    chunks = []
    for start in range(0, n_frames, 16):  # bounds the float copy for long videos
        x = torch.from_numpy(np.ascontiguousarray(frames[start : start + 16]))
        x = x.permute(0, 3, 1, 2).float()  # (T, C, H, W)
        x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True)
        chunks.append(x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(chunks)


def _check_n_frames(n_frames: int) -> None:
    # The causal video tokenizer maps 1 + 4k frames to 1 + k latent frames.
    if n_frames < 1 or (n_frames - 1) % 4:
        lower = 1 + 4 * ((n_frames - 1) // 4)
        hint = "1" if lower < 1 else f"{lower + 4} or {lower}"
        raise ValueError(f"n_frames must be 1+4k, got {n_frames}: pass {hint}")


def check_clip_settings(
    n_frames: int, size: int, fps: float | None, clips_per_video: int | None
) -> None:
    """The clip settings a video dataset takes, checked; errors name the fix."""
    _check_n_frames(n_frames)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}: pass e.g. 256")
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}: pass e.g. 8.0, or None")
    if clips_per_video is not None and clips_per_video < 1:
        raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}: or pass None")


def cut_clips(frames: np.ndarray, n_frames: int, *, stride: int | None = None) -> list[np.ndarray]:
    """Cut ``(T, ...)`` into clips ``(n_frames, ...)`` starting every ``stride`` frames (default
    ``n_frames``: back to back). A tail shorter than ``n_frames`` is dropped. Clips are views."""
    _check_n_frames(n_frames)
    stride = n_frames if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}: pass None for back-to-back clips")
    return [frames[s : s + n_frames] for s in range(0, len(frames) - n_frames + 1, stride)]


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """``items`` in a random order drawn from ``rng``, holding at most ``size`` at a time: each
    new item takes the place of a random one of the buffer, which is yielded."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(T, H, W, C)`` → float32 ``(C, T, H, W)`` in [-1, 1]."""
    _check_frames(frames)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # (C, T, H, W)
    return x.float() / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """float ``(C, T, H, W)`` in [-1, 1] (clamped) → uint8 ``(T, H, W, C)``, rounded to nearest."""
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or not video.is_floating_point():
        got = f"{video.dtype} {tuple(video.shape)}" if isinstance(video, torch.Tensor) else video
        raise ValueError(f"video must be a float tensor (C, T, H, W), got {got}")
    x = (video.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5
    return x.round().to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()


# x264's kernels up to AVX2, for CPUs that also have AVX-512 (all of these come with it).
X264_AVX2 = "MMX2,SSE2Fast,SSSE3,SSE4.2,AVX,AVX2,FMA3,BMI2"


def x264_options(crf: int) -> dict[str, str]:
    """libx264's options: quality ``crf``, and on a CPU with AVX-512 its kernels up to AVX2.

    With its AVX-512 kernels x264 encoded the same frames into different streams from one
    write to the next in some process states (after a generation at one torch thread, as in
    the test suite), so one seed did not always make one mp4. Up to AVX2 it writes a 64×64
    minute as fast (480 frames: 0.28 against 0.29 s) and the same bytes every time.
    """
    options = {"crf": str(crf)}
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        options["x264-params"] = f"asm={X264_AVX2}"
    return options


class VideoWriter:
    """Stream frames into an ``.mp4`` (H.264, yuv420p, quality ``crf``) or ``.gif`` file.

    Frames go to a temporary file in the target folder, moved into place by :meth:`close`, so a
    crash never leaves a half-written file at ``path``; leaving a ``with`` block by an exception
    deletes the temporary file. GIF colours use FFmpeg's per-frame adaptive palette
    (palettegen → paletteuse), far closer than a fixed 256-colour palette.
    """

    def __init__(self, path: PathLike, fps: float, *, crf: int = 18) -> None:
        self.path = Path(path)
        self.suffix = self.path.suffix.lower()
        if self.suffix not in WRITE_SUFFIXES:
            raise ValueError(
                f"{self.path}: cannot write {self.suffix!r}; use one of {', '.join(WRITE_SUFFIXES)}"
            )
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51] (lower is better), got {crf}: try 18")
        if not self.path.parent.is_dir():
            raise ValueError(f"{self.path}: folder {self.path.parent} does not exist; create it")
        self.rate = Fraction(fps).limit_denominator(1001)  # 29.97 → 2997/100, 30000/1001 kept
        self.crf = crf
        self.n_written = 0
        self._size: tuple[int, int] | None = None
        self._stream: av.VideoStream | None = None
        self._graph: av.filter.Graph | None = None
        fd, tmp = tempfile.mkstemp(
            dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
        )
        os.close(fd)
        self._tmp = Path(tmp)
        try:
            self._container = av.open(tmp, "w", format=self.suffix[1:])
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise
        self._closed = False

    def _open_stream(self, height: int, width: int) -> None:
        if self.suffix == ".mp4" and (height % 2 or width % 2):
            raise ValueError(
                f"{self.path}: H.264 (yuv420p) needs even height and width, got {height}x{width}: "
                f"resize first, e.g. resize_video(frames, ({height // 2 * 2}, {width // 2 * 2}))"
            )
        if self.suffix == ".mp4":
            stream = self._container.add_stream(
                "libx264", rate=self.rate, options=x264_options(self.crf)
            )
            stream.pix_fmt = "yuv420p"
        else:
            stream = self._container.add_stream("gif", rate=self.rate)
            stream.pix_fmt = "pal8"
            # One palette per frame (stats_mode=single, new=1) so colour changes over time survive.
            graph = av.filter.Graph()
            source = graph.add_buffer(
                width=width, height=height, format="rgb24", time_base=1 / self.rate
            )
            split = graph.add("split")
            palettegen = graph.add("palettegen", "stats_mode=single")
            paletteuse = graph.add("paletteuse", "new=1")
            sink = graph.add("buffersink")
            source.link_to(split)
            split.link_to(palettegen, 0, 0)
            split.link_to(paletteuse, 1, 0)
            palettegen.link_to(paletteuse, 0, 1)
            paletteuse.link_to(sink)
            graph.configure()
            self._graph = graph
        stream.width, stream.height = width, height
        self._stream = stream

    def _encode(self, frame: av.VideoFrame | None) -> None:
        assert self._stream is not None
        if self._graph is None:
            self._container.mux(self._stream.encode(frame))
            return
        self._graph.push(frame)  # None flushes the filters
        while True:
            try:
                paletted = self._graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                break
            self._container.mux(self._stream.encode(paletted))
        if frame is None:
            self._container.mux(self._stream.encode(None))

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 ``(T, H, W, 3)`` RGB frames; every call must have the first call's size."""
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed; open a new VideoWriter")
        _check_frames(frames, rgb=True)
        size = (frames.shape[1], frames.shape[2])
        if self._size is None:
            self._open_stream(*size)
            self._size = size
        elif size != self._size:
            raise ValueError(
                f"{self.path}: frames are {size[0]}x{size[1]} but this writer was started at "
                f"{self._size[0]}x{self._size[1]}; resize them with resize_video first"
            )
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base = self.n_written, 1 / self.rate
            self._encode(frame)
            self.n_written += 1

    def close(self) -> None:
        """Flush the encoder and move the finished file to ``path``."""
        if self._closed:
            return
        if self.n_written == 0:
            self.abort()
            raise ValueError(f"{self.path}: no frames were written; call write() before close()")
        try:
            self._encode(None)
            self._container.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._closed = True

    def abort(self) -> None:
        """Discard everything written so far: the temporary file is removed, ``path`` untouched."""
        self._closed = True
        with contextlib.suppress(av.FFmpegError):  # a half-set-up muxer may refuse to finalize
            self._container.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(path: PathLike, frames: np.ndarray, fps: float, *, crf: int = 18) -> None:
    """Write uint8 ``(T, H, W, 3)`` RGB frames to ``path`` (``.mp4`` or ``.gif``, by suffix),
    atomically. mp4 needs even H and W."""
    _check_frames(frames, rgb=True)
    if len(frames) == 0:
        raise ValueError(f"{path}: frames is empty; pass at least one frame")
    with VideoWriter(path, fps, crf=crf) as writer:
        writer.write(frames)


def list_video_files(root: PathLike, *, include_images: bool = True) -> list[Path]:
    """All files under ``root`` (recursively, sorted) with a suffix in ``VIDEO_SUFFIXES`` (and
    ``IMAGE_SUFFIXES`` if ``include_images``), compared case-insensitively."""
    suffixes = VIDEO_SUFFIXES + IMAGE_SUFFIXES if include_images else VIDEO_SUFFIXES
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def held_out_files(files: Iterable[Path], root: PathLike, share: float) -> list[Path]:
    """The ``files`` (under ``root``) held out of training for evaluation: those whose path
    relative to ``root`` hashes below ``share``, so such a file stays held out whatever files
    join the folder. From ``HOLD_OUT_MIN_FILES`` files on, at least one is held out (and at
    least one is not): when no hash is below ``share``, the file with the lowest, which goes
    back to training once a file joins with a hash below its own; from fewer, none, since each
    would be too large a share of the training data. Adding files to a folder a run trained on
    can therefore move a file it trained on into the held-out set (crossing ten files, or
    through that rule); the tokenizer's training warns when a resumed run's set changed.

    The hash is SHA-1 of the relative POSIX path, read as a number in [0, 1)."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the held-out share must be in [0, 1), got {share}")
    files = list(files)
    if share == 0.0 or len(files) < HOLD_OUT_MIN_FILES:
        return []

    def place(path: Path) -> float:
        name = Path(path).relative_to(root).as_posix().encode()
        return int.from_bytes(hashlib.sha1(name).digest()[:8], "big") / 2**64

    ranked = sorted((place(path), path) for path in files)
    held = [path for u, path in ranked if u < share][: len(files) - 1]
    return sorted(held or [ranked[0][1]])


class VideoFolder(IterableDataset[torch.Tensor]):
    """Clips ``(C, n_frames, size, size)`` in [-1, 1] from every video (and, when ``n_frames`` is
    1 and ``include_images``, every image) under ``root``.

    Each file is read (resampled to ``fps`` if given), centre-cropped and resized to ``size``, and
    cut into back-to-back clips; ``clips_per_video`` keeps only the first clips (and decodes only
    what they need). One pass per ``__iter__``; with ``shuffle`` the file order of pass ``e`` is
    seeded by ``seed + e`` (call :meth:`set_epoch` when DataLoader workers are not persistent,
    since each pass then starts from a fresh copy). Files are split across DataLoader workers.
    Unreadable files are skipped with one warning each and recorded in ``skipped``
    (path → reason); counters are per pass and per process (each worker keeps its own).

    Three options for training on few videos, off by default: ``jitter`` starts each file's
    clips at a random frame in ``[0, n_frames)`` every pass (so a pass cuts other clips than the
    last; a file may give one clip fewer), ``flip`` mirrors each clip left to right with
    probability 1/2, and ``shuffle_buffer`` = k > 1 yields the clips through a k-clip shuffle
    buffer (each worker its own), so that a batch mixes clips of several files instead of holding
    consecutive clips of one. All are drawn from ``seed``, the pass and the worker: a pass is the
    same every time it is repeated (resumable by counting batches).

    ``hold_out`` = s > 0 keeps the files :func:`held_out_files` picks at share s out of every
    pass, for evaluation; ``held_out=True`` reads only those instead (an error when there are
    none: a folder of fewer than ``HOLD_OUT_MIN_FILES`` files).
    """

    def __init__(
        self,
        root: PathLike,
        *,
        n_frames: int,
        size: int,
        fps: float | None = None,
        shuffle: bool = True,
        seed: int = 0,
        include_images: bool = True,
        clips_per_video: int | None = None,
        jitter: bool = False,
        flip: bool = False,
        shuffle_buffer: int = 0,
        hold_out: float = 0.0,
        held_out: bool = False,
    ) -> None:
        super().__init__()
        check_clip_settings(n_frames, size, fps, clips_per_video)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 (0 or 1: off), got {shuffle_buffer}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"VideoFolder root {self.root} is not a folder; check the path")
        use_images = include_images and n_frames == 1  # a still makes only a 1-frame clip
        self.files = list_video_files(self.root, include_images=use_images)
        if not self.files:
            accepted = VIDEO_SUFFIXES + IMAGE_SUFFIXES if use_images else VIDEO_SUFFIXES
            raise ValueError(
                f"VideoFolder root {self.root} has no files with suffixes {', '.join(accepted)}"
                + ("" if use_images else " (images are used only when n_frames == 1)")
            )
        held = held_out_files(self.files, self.root, hold_out)
        if held_out and not held:
            raise ValueError(
                f"VideoFolder root {self.root} holds out no files at the share {hold_out} "
                f"({len(self.files)} files): evaluation needs a folder of "
                f"{HOLD_OUT_MIN_FILES} files or more, or a folder of its own"
            )
        if hold_out > 0:
            out = set(held)
            self.files = held if held_out else [p for p in self.files if p not in out]
        self.n_frames, self.size, self.fps = n_frames, size, fps
        self.shuffle, self.seed, self.clips_per_video = shuffle, seed, clips_per_video
        self.jitter, self.flip, self.shuffle_buffer = jitter, flip, shuffle_buffer
        self.epoch = 0
        self.skipped: dict[Path, str] = {}
        self.n_read = self.n_clips = self.n_too_short = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use the shuffle of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        files = list(self.files)
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(files)  # same order in every worker
        worker = get_worker_info()
        worker_id = 0 if worker is None else worker.id
        rng = random.Random(f"{self.seed}/{self.epoch}/{worker_id}")  # jitter, flip, buffer
        self.epoch += 1
        if worker is not None:
            files = files[worker.id :: worker.num_workers]
        clips = self._clips(files, rng)
        if self.shuffle_buffer > 1:  # copies: a view would hold its whole file's frames
            clips = shuffled((clip.copy() for clip in clips), self.shuffle_buffer, rng)
        for clip in clips:
            yield frames_to_tensor(clip)  # (C, n_frames, size, size)

    def _clips(self, files: list[Path], rng: random.Random) -> Iterator[np.ndarray]:
        """uint8 clips ``(n_frames, size, size, 3)`` of ``files`` in order (jittered and
        mirrored as configured, drawing from ``rng``); counts them."""
        self.n_read = self.n_clips = self.n_too_short = 0
        max_frames = None
        if self.clips_per_video is not None:  # the first clips, from the latest start
            max_frames = self.clips_per_video * self.n_frames + (self.n_frames - 1) * self.jitter
        for path in files:
            if path in self.skipped:  # warned once already
                continue
            try:
                frames, _ = read_video(path, fps=self.fps, max_frames=max_frames)
            except VideoReadError as e:
                self.skipped[path] = str(e)
                warnings.warn(
                    f"VideoFolder: skipping {e} ({len(self.skipped)} bad files so far)",
                    stacklevel=2,
                )
                continue
            self.n_read += 1
            start = rng.randrange(self.n_frames) if self.jitter else 0
            if len(frames) - start < self.n_frames:  # too short from this start: from 0
                start = 0
            n_used = (len(frames) - start) // self.n_frames * self.n_frames
            if self.clips_per_video is not None:
                n_used = min(n_used, self.clips_per_video * self.n_frames)
            if n_used == 0:
                self.n_too_short += 1
                continue
            frames = resize_video(frames[start : start + n_used], self.size)  # (T, size, size, 3)
            for clip in cut_clips(frames, self.n_frames):
                self.n_clips += 1
                yield clip[:, :, ::-1] if self.flip and rng.random() < 0.5 else clip

    def summary(self) -> str:
        """Counts of the last pass in this process, e.g. for logging after an epoch."""
        return (
            f"read {self.n_read} files, {self.n_clips} clips; "
            f"skipped {len(self.skipped)} bad files, {self.n_too_short} too short"
        )
