"""The pixel-only fidelity scorer on videos the shapes world renders (specs/shapes-world.md)."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest

from loong.data.shapes import (
    BACKGROUNDS,
    DIRECTIONS,
    PALETTE,
    SHAPES,
    SIZES,
    SPEEDS,
    Scene,
    ShapeObject,
    caption,
    parse_caption,
    render,
    sample_scene,
)
from loong.evaluate.fidelity import (
    fidelity_by_span,
    measure_frame,
    score_video,
    score_window,
)


def _components(mask: np.ndarray) -> list[int]:
    """Reference: areas of the 4-connected components by breadth-first search, largest first."""
    seen = np.zeros_like(mask)
    areas = []
    for i, j in zip(*np.nonzero(mask), strict=True):
        if seen[i, j]:
            continue
        seen[i, j], queue, area = True, deque([(i, j)]), 0
        while queue:
            a, b = queue.popleft()
            area += 1
            for u, v in ((a - 1, b), (a + 1, b), (a, b - 1), (a, b + 1)):
                inside = 0 <= u < mask.shape[0] and 0 <= v < mask.shape[1]
                if inside and mask[u, v] and not seen[u, v]:
                    seen[u, v] = True
                    queue.append((u, v))
        areas.append(area)
    return sorted(areas, reverse=True)


def test_blob_labelling_matches_breadth_first_search() -> None:
    rng = np.random.default_rng(0)
    comb = np.zeros((48, 80), dtype=bool)  # teeth that join only at the bottom row
    comb[:, ::3], comb[-1] = True, True
    masks = [comb] + [rng.random((48, 80)) < p for p in (0.1, 0.3, 0.4, 0.45) for _ in range(5)]
    for mask in masks:
        assert mask.mean() < 0.5  # black stays the most common colour
        frame = np.zeros((48, 80, 3), dtype=np.uint8)
        frame[mask] = PALETTE["white"]
        measure = measure_frame(frame)
        areas = _components(mask)
        assert measure is not None
        assert (measure.n_blobs, measure.area) == (len(areas), areas[0])
        assert measure.second_area == (areas[1] if len(areas) > 1 else 0)
    assert measure_frame(np.full((64, 64, 3), 64, dtype=np.uint8)) is None


def test_measure_frame_reads_a_rendered_frame() -> None:
    scene = parse_caption("a large orange circle moves up on a navy background")
    measure = measure_frame(render(scene, seed=0, n_frames=1)[0])
    assert measure is not None
    assert (measure.colour, measure.shape, measure.n_blobs) == ("orange", "circle", 1)
    assert measure.mean_rgb == PALETTE["orange"]
    assert 0.65 <= measure.fill_ratio <= 0.9


@pytest.mark.parametrize("width", [64, 128])
def test_rendered_minutes_score_one(width: int) -> None:
    rng = np.random.default_rng(width)
    for k in range(3):
        scene = sample_scene(rng, max_objects=1)
        frames = render(scene, seed=k, n_frames=480, height=width, width=width)  # 60 s at 8 fps
        windows = score_video(frames, caption(scene))
        assert len(windows) == 60
        assert all(w["all"] for w in windows), (caption(scene), windows)
        assert fidelity_by_span(windows, fps=8.0, window_seconds=1.0) == [1.0] * 6


def test_every_object_kind_scores_one() -> None:
    kinds = itertools.product(SHAPES, SIZES, DIRECTIONS, SPEEDS)
    colours, backgrounds = list(PALETTE), list(BACKGROUNDS)
    for seed, (shape, size, direction, speed) in enumerate(kinds):
        colour, background = colours[seed % 8], backgrounds[seed % 3]
        obj = ShapeObject(colour=colour, shape=shape, direction=direction, size=size, speed=speed)
        scene = Scene(objects=(obj,), background=background)
        width = 128 if seed % 4 == 0 else 64
        frames = render(scene, seed=seed, n_frames=24, height=64, width=width, start=seed)
        windows = score_video(frames, caption(scene))
        assert all(w["all"] for w in windows), (caption(scene), windows)


def test_still_caption_scores_one() -> None:
    scene = parse_caption("a large white triangle on a gray background")
    frames = render(scene, seed=0, n_frames=1)
    assert score_video(frames, caption(scene)) == [
        dict.fromkeys(("presence", "colour", "shape", "speed", "axis", "all"), True)
    ]


def _right_mover(colour: str = "red", shape: str = "circle") -> tuple[ShapeObject, np.ndarray]:
    obj = ShapeObject(colour=colour, shape=shape, direction="right", size="large")
    return obj, render(Scene(objects=(obj,)), seed=1, n_frames=8)


def test_frozen_object_fails_speed() -> None:
    obj, frames = _right_mover()
    assert score_window(frames, obj)["all"]
    frozen = score_window(np.repeat(frames[:1], 8, axis=0), obj)
    assert not frozen["speed"] and not frozen["all"]
    assert frozen["presence"] and frozen["colour"] and frozen["shape"]


def test_recoloured_object_fails_colour() -> None:
    obj, frames = _right_mover()
    recoloured = frames.copy()
    recoloured[(frames == PALETTE["red"]).all(axis=-1)] = PALETTE["blue"]
    scores = score_window(recoloured, obj)
    assert not scores["colour"] and not scores["all"]
    assert scores["presence"] and scores["shape"] and scores["speed"]


def test_missing_object_fails_presence() -> None:
    obj, frames = _right_mover()
    empty = np.zeros_like(frames)
    assert not score_window(empty, obj)["presence"]
    partly = frames.copy()
    partly[4] = 0
    assert not score_window(partly, obj)["presence"]


def test_square_in_place_of_circle_fails_shape() -> None:
    _, frames = _right_mover(shape="square")
    circle = ShapeObject(colour="red", shape="circle", direction="right", size="large")
    scores = score_window(frames, circle)
    assert not scores["shape"] and scores["presence"] and scores["colour"]


def test_wrong_axis_and_size_fail() -> None:
    obj, frames = _right_mover()
    up = ShapeObject(colour="red", shape="circle", direction="up", size="large")
    assert not score_window(frames, up)["axis"]
    diagonal = ShapeObject(colour="red", shape="circle", direction="up-right", size="large")
    assert not score_window(frames, diagonal)["axis"]
    tiny = score_window(frames, ShapeObject(colour="red", shape="circle", direction="right"))
    assert not tiny["presence"]  # a large circle is 316 px, more than twice a small one (112)
    assert score_window(frames, obj, width=256)["presence"] is False


def test_stray_pixels_do_not_break_presence_but_a_second_object_does() -> None:
    obj, frames = _right_mover()
    noisy = frames.copy()
    noisy[:, 0, 0] = PALETTE["white"]
    assert score_window(noisy, obj)["all"]
    two = parse_caption("a large red circle moves right and a large green square moves down")
    assert not score_window(render(two, seed=1, n_frames=8), obj)["presence"]


def test_fidelity_by_span() -> None:
    windows = [{"all": k < 10} for k in range(20)] + [{"all": k % 2 == 0} for k in range(5)]
    assert fidelity_by_span(windows, fps=8.0, window_seconds=1.0) == [1.0, 0.0, 0.6]
    assert fidelity_by_span(windows, fps=8.0, window_seconds=0.5, span_seconds=5.0) == [
        1.0,
        0.0,
        0.6,
    ]
    assert fidelity_by_span([], fps=8.0, window_seconds=1.0) == []


def test_bad_inputs_raise() -> None:
    obj, frames = _right_mover()
    with pytest.raises(ValueError, match="single-object"):
        score_video(frames, "a red circle moves right and a blue square moves up")
    with pytest.raises(ValueError, match="uint8"):
        score_video(frames.astype(np.float32), "a red circle moves right")
    with pytest.raises(ValueError, match="caption"):
        score_video(frames, "a red blob moves right")
    with pytest.raises(ValueError, match="2 frames"):
        score_window(frames[:1], obj)
