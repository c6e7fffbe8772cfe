"""Fidelity of a video to a single-object shapes-world caption, from its pixels alone.

Implements "Measuring a video against its caption" of ``specs/shapes-world.md``; the choices it
leaves open:

- Background: the most common exact RGB colour of the frame (ties: the smallest packed RGB value).
- Blobs: 4-connected components of the pixels farther than 60 (Euclidean RGB) from the background,
  labelled on row runs with a vectorised union-find (numpy only, no scipy).
- Fill ratio: blob area over the area of its pixel bounding box. Centroid: mean pixel centre
  (j + 0.5, i + 0.5).
- Expected area: the exact pixel count the renderer draws for the captioned shape and size
  (``shape_mask``), at the given width.
- Window: presence, colour and shape must hold in every frame of the window. "One blob" means no
  second blob larger than half the expected area (stray noise pixels are allowed). Motion uses the
  T − 1 centroid steps inside the window; the direction's sign is not checked (bounces flip it).
- A still caption (no direction) passes speed when the mean step is under half the slowest speed,
  and axis trivially.
- ``score_video`` cuts the video into consecutive windows of round(fps·window_seconds) frames; a
  shorter last window is kept when it can still be scored (2 frames, 1 for a still caption).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loong.data.shapes import (
    DIRECTIONS,
    PALETTE,
    ShapeObject,
    half_extent,
    parse_caption,
    pixel_speed,
    shape_mask,
)

BACKGROUND_DISTANCE = 60.0
"""A pixel belongs to an object when its RGB distance to the background exceeds this."""
CHECKS = ("presence", "colour", "shape", "speed", "axis")

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float64)  # (8, 3)


@dataclass(frozen=True, kw_only=True)
class FrameMeasure:
    """What one frame shows: its largest non-background blob and how many blobs there are."""

    colour: str
    """Palette name nearest to the blob's mean colour."""
    mean_rgb: tuple[float, float, float]
    shape: str
    """"square" (fill > 0.9), "circle" (0.65–0.9) or "triangle" (< 0.65)."""
    fill_ratio: float
    area: int
    """Pixels in the blob."""
    centroid: tuple[float, float]
    """(x, y) in pixels, pixel (i, j) centred at (j + 0.5, i + 0.5)."""
    n_blobs: int
    second_area: int
    """Pixels in the second-largest blob (0 when there is one)."""


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Horizontal runs of True pixels in raster order: rows, starts, ends (exclusive); each (R,)."""
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # (H, W + 1): +1 where a run starts, −1 one past its end
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    return rows, starts, ends


def _label_runs(rows: np.ndarray, starts: np.ndarray, ends: np.ndarray, width: int) -> np.ndarray:
    """Component id (the smallest run index in it) of every run under 4-connectivity; (R,)."""
    n = len(rows)
    # Keys order runs by (row, column); runs of the row above overlapping run b form the index
    # range [lo, hi]: those ending after b starts and starting before b ends.
    stride = width + 1
    start_keys, end_keys = rows * stride + starts, rows * stride + ends
    lo = np.searchsorted(end_keys, (rows - 1) * stride + starts, side="right")
    hi = np.searchsorted(start_keys, (rows - 1) * stride + ends, side="left") - 1
    counts = np.maximum(hi - lo + 1, 0)
    b = np.repeat(np.arange(n), counts)
    a = (
        np.repeat(lo, counts)
        + np.arange(counts.sum())
        - np.repeat(np.cumsum(counts) - counts, counts)
    )
    # Union-find by hooking the larger root under the smaller, then full path compression.
    parent = np.arange(n)
    while True:
        root_a, root_b = parent[a], parent[b]
        differ = root_a != root_b
        if not differ.any():
            return parent
        small, large = np.minimum(root_a, root_b)[differ], np.maximum(root_a, root_b)[differ]
        np.minimum.at(parent, large, small)
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand


def nearest_colour(rgb: np.ndarray) -> str:
    """The palette name nearest (Euclidean, RGB) to a mean colour ``rgb`` (3,)."""
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE_RGB - rgb) ** 2).sum(axis=1)))]


def measure_frame(frame: np.ndarray) -> FrameMeasure | None:
    """Measure the largest object blob of a frame uint8 (H, W, 3); None when nothing differs."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8 (H, W, 3), got {frame.dtype} {frame.shape}")
    rgb = frame.astype(np.int32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W)
    values, counts = np.unique(packed, return_counts=True)
    code = int(values[np.argmax(counts)])
    background = np.array([code >> 16, (code >> 8) & 255, code & 255], dtype=np.int32)
    diff = rgb - background
    mask = (diff * diff).sum(axis=-1) > BACKGROUND_DISTANCE**2  # (H, W)
    if not mask.any():
        return None

    rows, starts, ends = _runs(mask)
    _, component = np.unique(_label_runs(rows, starts, ends, frame.shape[1]), return_inverse=True)
    lengths = ends - starts
    areas = np.bincount(component, weights=lengths).astype(np.int64)
    largest = int(np.argmax(areas))
    second = int(np.sort(areas)[-2]) if len(areas) > 1 else 0

    keep = component == largest
    rows, starts, ends, lengths = rows[keep], starts[keep], ends[keep], lengths[keep]
    area = int(areas[largest])
    box = (rows.max() - rows.min() + 1) * (ends.max() - starts.min())
    fill = area / float(box)
    x = float((lengths * (starts + ends)).sum() / (2 * area))  # Σ (j + 0.5) over each run
    y = float((lengths * (rows + 0.5)).sum() / area)
    # Colour sums over runs from per-row prefix sums, without expanding runs to pixels.
    prefix = np.zeros((len(rows), frame.shape[1] + 1, 3), dtype=np.int64)  # (R, W + 1, 3)
    np.cumsum(rgb[rows], axis=1, out=prefix[:, 1:])
    run = np.arange(len(rows))
    mean = (prefix[run, ends] - prefix[run, starts]).sum(axis=0) / area  # (3,)
    shape = "square" if fill > 0.9 else "circle" if fill >= 0.65 else "triangle"
    return FrameMeasure(
        colour=nearest_colour(mean),
        mean_rgb=(float(mean[0]), float(mean[1]), float(mean[2])),
        shape=shape,
        fill_ratio=fill,
        area=area,
        centroid=(x, y),
        n_blobs=len(areas),
        second_area=second,
    )


def expected_area(obj: ShapeObject, width: int) -> int:
    """Pixels the world draws for ``obj`` in a frame ``width`` pixels wide: presence asks for a
    blob of 0.5–2 times this."""
    return int(shape_mask(obj.shape, half_extent(obj.size, width)).sum())


def _score_measures(
    measures: list[FrameMeasure | None], obj: ShapeObject, *, width: int
) -> dict[str, bool]:
    expected = expected_area(obj, width)
    seen = [m for m in measures if m is not None]
    complete = len(seen) == len(measures)
    result = {
        "presence": complete
        and all(0.5 * expected <= m.area <= 2 * expected for m in seen)
        and all(m.second_area <= 0.5 * expected for m in seen),
        "colour": bool(seen) and all(m.colour == obj.colour for m in seen),
        "shape": bool(seen) and all(m.shape == obj.shape for m in seen),
    }
    slowest = pixel_speed("slowly", width)
    if len(measures) < 2:
        result["speed"] = result["axis"] = complete
    elif not complete:
        result["speed"] = result["axis"] = False
    else:
        centroids = np.array([m.centroid for m in seen])  # (T, 2)
        mx, my = np.abs(np.diff(centroids, axis=0)).mean(axis=0)
        step = mx + my
        if obj.direction is None:
            result["speed"], result["axis"] = bool(step < 0.5 * slowest), True
        else:
            dx, dy = DIRECTIONS[obj.direction]
            implied = pixel_speed(obj.speed, width) * (abs(dx) + abs(dy))
            result["speed"] = bool(0.5 * implied <= step <= 2 * implied)
            if dy == 0:
                result["axis"] = bool(my < mx / 2)
            elif dx == 0:
                result["axis"] = bool(mx < my / 2)
            else:
                result["axis"] = bool(my / 2 <= mx <= 2 * my)
    result["all"] = all(result[k] for k in CHECKS)
    return result


def _check_frames(frames: np.ndarray) -> None:
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")


def score_window(
    frames: np.ndarray, obj: ShapeObject, *, width: int | None = None
) -> dict[str, bool]:
    """Checks of one window of frames uint8 (T, H, W, 3) against one captioned object.

    ``width`` is the frame width sizes and speeds scale with (default: the frames' width). Returns
    {"presence", "colour", "shape", "speed", "axis", "all"} → bool. A moving object needs T ≥ 2.
    """
    _check_frames(frames)
    if obj.direction is not None and len(frames) < 2:
        raise ValueError(f"a moving object needs a window of >= 2 frames, got {len(frames)}")
    measures = [measure_frame(frame) for frame in frames]
    return _score_measures(measures, obj, width=width or frames.shape[2])


def _window_length(fps: float, window_seconds: float) -> int:
    n = round(fps * window_seconds)
    if fps <= 0 or n < 1:
        raise ValueError(
            f"fps·window_seconds must round to >= 1 frame, got {fps}·{window_seconds}: "
            "pass e.g. fps=8.0, window_seconds=1.0"
        )
    return n


def score_video(
    frames: np.ndarray, caption: str, *, fps: float = 8.0, window_seconds: float = 1.0
) -> list[dict[str, bool]]:
    """Per-window checks (see ``score_window``) of a video uint8 (T, H, W, 3) against a caption.

    The caption must be a canonical single-object caption; windows are consecutive runs of
    round(fps·window_seconds) frames.
    """
    _check_frames(frames)
    scene = parse_caption(caption)
    if len(scene.objects) != 1:
        raise ValueError(
            f"score_video scores single-object captions, got {len(scene.objects)} objects in "
            f"{caption!r}: score each object's own clip, e.g. 'a red circle moves right'"
        )
    obj = scene.objects[0]
    n = _window_length(fps, window_seconds)
    shortest = 1 if obj.direction is None else 2
    if obj.direction is not None and n < 2:
        raise ValueError(f"windows of {n} frame cannot measure motion: raise window_seconds")
    if len(frames) < shortest:
        raise ValueError(f"{caption!r} needs at least {shortest} frames, got {len(frames)}")
    measures = [measure_frame(frame) for frame in frames]
    windows = [measures[k : k + n] for k in range(0, len(measures), n)]
    return [_score_measures(w, obj, width=frames.shape[2]) for w in windows if len(w) >= shortest]


def fidelity_by_span(
    window_scores: list[dict[str, bool]],
    *,
    fps: float,
    window_seconds: float,
    span_seconds: float = 10.0,
) -> list[float]:
    """Share of windows passing every check, per span of ``span_seconds`` (by window start).

    A span no window starts in (windows longer than spans) gets NaN.
    """
    if span_seconds <= 0:
        raise ValueError(f"span_seconds must be > 0, got {span_seconds}")
    n = _window_length(fps, window_seconds)
    passed: dict[int, list[bool]] = {}
    for k, scores in enumerate(window_scores):
        span = int(k * n / (fps * span_seconds) + 1e-9)
        passed.setdefault(span, []).append(scores["all"])
    n_spans = max(passed) + 1 if passed else 0
    return [float(np.mean(passed[s])) if s in passed else float("nan") for s in range(n_spans)]
