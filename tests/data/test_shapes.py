"""Invariants of the shapes world (specs/shapes-world.md)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from loong.data.shapes import (
    BACKGROUNDS,
    DIRECTIONS,
    PALETTE,
    SHAPES,
    SIZES,
    SPEEDS,
    Scene,
    ShapeObject,
    ShapesWorld,
    ShapesWorldConfig,
    caption,
    half_extent,
    object_positions,
    paraphrase,
    parse_caption,
    pixel_speed,
    render,
    sample_scene,
    shape_mask,
)


def _scene(**fields: str) -> Scene:
    background = fields.pop("background", "black")
    return Scene(objects=(ShapeObject(**fields),), background=background)


def _object_mask(frame: np.ndarray, background: str) -> np.ndarray:
    return (frame != np.array(BACKGROUNDS[background], dtype=np.uint8)).any(axis=-1)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def _stepwise(u0: int, velocity: int, span: int, n: int) -> tuple[list[int], list[int]]:
    """Reference: step by step; a step past a wall is reflected and the velocity flips."""
    positions, velocities, u = [], [], u0
    for _ in range(n):
        positions.append(u)
        velocities.append(velocity)
        u += velocity
        if u > span:
            u, velocity = 2 * span - u, -velocity
        elif u < 0:
            u, velocity = -u, -velocity
    return positions, velocities


def test_render_is_deterministic() -> None:
    scene = parse_caption("a yellow triangle moves down and a small white circle moves left")
    a = render(scene, seed=3, n_frames=20)
    assert a.dtype == np.uint8 and a.shape == (20, 64, 64, 3)
    assert a.tobytes() == render(scene, seed=3, n_frames=20).tobytes()
    assert a.tobytes() != render(scene, seed=4, n_frames=20).tobytes()


def test_captions_round_trip() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        text = caption(scene)
        assert parse_caption(text) == scene
        assert caption(parse_caption(text)) == text
        still = caption(scene, still=True)
        assert "moves" not in still
        assert parse_caption(still) == scene.without_motion()
        assert caption(parse_caption(still)) == still


def test_canonical_form_omits_defaults() -> None:
    obj = ShapeObject(colour="red", shape="circle", direction="right")
    assert caption(Scene(objects=(obj,))) == "a red circle moves right"
    big = ShapeObject(
        colour="blue", shape="square", direction="up-left", size="large", speed="quickly"
    )
    text = "a large blue square moves up-left quickly on a gray background"
    assert caption(Scene(objects=(big,), background="gray")) == text
    assert caption(Scene(objects=(big,), background="gray"), still=True) == (
        "a large blue square on a gray background"
    )


def test_spec_examples_parse() -> None:
    assert parse_caption("a red circle moves right") == _scene(
        colour="red", shape="circle", direction="right"
    )
    assert parse_caption(
        "a large blue square moves up-left quickly on a gray background"
    ) == _scene(
        colour="blue",
        shape="square",
        direction="up-left",
        size="large",
        speed="quickly",
        background="gray",
    )
    two = parse_caption("a yellow triangle moves down and a small white circle moves left")
    assert two.objects == (
        ShapeObject(colour="yellow", shape="triangle", direction="down"),
        ShapeObject(colour="white", shape="circle", direction="left"),
    )
    assert parse_caption("a red circle") == _scene(colour="red", shape="circle", direction=None)
    assert parse_caption("a large blue square on a gray background").background == "gray"
    # Tolerated: case, extra spaces, a final full stop, explicit defaults, "an".
    assert parse_caption("  A Red   circle MOVES right.") == parse_caption(
        "a red circle moves right"
    )
    explicit = "a small red circle moves right slowly on a black background"
    assert parse_caption(explicit) == parse_caption("a red circle moves right")
    assert parse_caption("an orange circle moves up").objects[0].colour == "orange"


@pytest.mark.parametrize(
    "text",
    [
        "a red hexagon moves right",
        "two red circles",
        "a red circle moves sideways",
        "a red circle moves right on a pink background",
        "a red circle and a blue square and a green circle",
        "a red circle and a blue square moves left",  # mixes a still and a moving object
        "",
    ],
)
def test_bad_captions_raise(text: str) -> None:
    with pytest.raises(ValueError, match="caption") as info:
        parse_caption(text)
    assert repr(text) in str(info.value)


def test_bad_objects_and_sizes_raise() -> None:
    with pytest.raises(ValueError, match="pick one of red, green"):
        ShapeObject(colour="pink", shape="circle", direction="up")
    with pytest.raises(ValueError, match="direction"):
        ShapeObject(colour="red", shape="circle", direction="north")
    with pytest.raises(ValueError, match="still object"):
        ShapeObject(colour="red", shape="circle", direction=None, speed="quickly")
    with pytest.raises(ValueError, match="1 or 2 objects"):
        Scene(objects=())
    scene = parse_caption("a red circle moves right")
    for height, width in [(48, 64), (64, 72), (64, 100), (64, 256)]:
        with pytest.raises(ValueError, match=r"height|width"):
            render(scene, seed=0, n_frames=1, height=height, width=width)
    with pytest.raises(ValueError, match="n_frames"):
        render(scene, seed=0, n_frames=0)
    with pytest.raises(ValueError, match="width"):
        ShapesWorldConfig(width=80 + 1)
    with pytest.raises(ValueError, match="still_prob"):
        ShapesWorldConfig(still_prob=1.5)


@pytest.mark.parametrize("width, small, large", [(64, 6, 10), (128, 12, 20), (256, 24, 40)])
def test_sizes(width: int, small: int, large: int) -> None:
    assert (half_extent("small", width), half_extent("large", width)) == (small, large)
    for size, s in [("small", small), ("large", large)]:
        scene = _scene(colour="green", shape="square", direction="up", size=size)
        frame = render(scene, seed=1, n_frames=1, height=width, width=width)[0]
        r0, r1, c0, c1 = _bbox(_object_mask(frame, "black"))
        assert (r1 - r0, c1 - c0) == (2 * s, 2 * s)


@pytest.mark.parametrize("width", [64, 128])
def test_fill_ratios(width: int) -> None:
    wanted = {"circle": (0.75, 0.82), "square": (1.0, 1.0), "triangle": (0.5, 0.56)}
    for shape, size in itertools.product(SHAPES, SIZES):
        frame = render(
            _scene(colour="cyan", shape=shape, direction="down", size=size),
            seed=2,
            n_frames=1,
            height=width,
            width=width,
        )[0]
        mask = _object_mask(frame, "black")
        r0, r1, c0, c1 = _bbox(mask)
        fill = mask.sum() / ((r1 - r0) * (c1 - c0))
        low, high = wanted[shape]
        assert low <= fill <= high, (shape, size, fill)
        assert mask.sum() == shape_mask(shape, half_extent(size, width)).sum()


def test_sprite_render_matches_per_pixel_reference() -> None:
    scene = parse_caption(
        "a large purple triangle moves up-right quickly and a white circle moves up"
    )
    frames = render(scene, seed=5, n_frames=30, height=64, width=96, start=7)
    centres = object_positions(scene, seed=5, frame_indices=np.arange(7, 37), height=64, width=96)
    jj, ii = np.meshgrid(np.arange(96), np.arange(64))
    for t in range(30):
        expected = np.zeros((64, 96, 3), dtype=np.uint8)
        for obj, xy in reversed(list(zip(scene.objects, centres[:, t], strict=True))):
            s = half_extent(obj.size, 96)
            # Doubled coordinates of pixel centres (j + 0.5, i + 0.5) relative to (x, y).
            x2, y2 = 2 * jj + 1 - 2 * xy[0], 2 * ii + 1 - 2 * xy[1]
            box = (np.abs(x2) <= 2 * s) & (np.abs(y2) <= 2 * s)
            if obj.shape == "circle":
                inside = x2**2 + y2**2 <= 4 * s * s
            elif obj.shape == "square":
                inside = box
            else:
                inside = box & (2 * np.abs(x2) <= y2 + 2 * s)
            expected[inside] = PALETTE[obj.colour]
        np.testing.assert_array_equal(frames[t], expected)


@pytest.mark.parametrize("width", [64, 128])
def test_walls_bounce_and_shapes_stay_inside(width: int) -> None:
    height = 64
    n = 2000
    for direction, size, speed in itertools.product(DIRECTIONS, SIZES, SPEEDS):
        obj = ShapeObject(colour="red", shape="square", direction=direction, size=size, speed=speed)
        scene = Scene(objects=(obj,))
        s, v = half_extent(size, width), pixel_speed(speed, width)
        xy = object_positions(
            scene, seed=11, frame_indices=np.arange(n), height=height, width=width
        )[0]
        assert (xy[:, 0] >= s).all() and (xy[:, 0] <= width - s).all()
        assert (xy[:, 1] >= s).all() and (xy[:, 1] <= height - s).all()
        dx, dy = DIRECTIONS[direction]
        # The closed form equals the step-by-step simulation; velocities keep their magnitude.
        xs, vxs = _stepwise(int(xy[0, 0]) - s, v * dx, width - 2 * s, n)
        ys, vys = _stepwise(int(xy[0, 1]) - s, v * dy, height - 2 * s, n)
        np.testing.assert_array_equal(xy[:, 0], np.array(xs) + s)
        np.testing.assert_array_equal(xy[:, 1], np.array(ys) + s)
        assert {abs(u) for u in vxs} == {v * abs(dx)} and {abs(u) for u in vys} == {v * abs(dy)}
        if dy == 0:
            assert (xy[:, 1] == xy[0, 1]).all()  # a horizontal mover stays on its row
        if dx == 0:
            assert (xy[:, 0] == xy[0, 0]).all()
        # Away from walls each step is exactly the speed along each moving axis.
        steps = np.abs(np.diff(xy, axis=0))
        assert np.median(steps[:, 0]) == v * abs(dx) and np.median(steps[:, 1]) == v * abs(dy)
        assert (steps <= v).all()
    # Rendered pixels: nothing is ever clipped by the frame edge.
    obj = ShapeObject(colour="red", shape="square", direction="down-right", size="large")
    frames = render(Scene(objects=(obj,)), seed=0, n_frames=n, height=height, width=width)
    area = _object_mask(frames, "black").sum(axis=(1, 2))
    assert (area == 4 * half_extent("large", width) ** 2).all()


@pytest.mark.parametrize("width, slow, quick", [(64, 1, 2), (128, 2, 4), (256, 4, 8)])
def test_pixel_speeds(width: int, slow: int, quick: int) -> None:
    assert (pixel_speed("slowly", width), pixel_speed("quickly", width)) == (slow, quick)


def test_start_gives_frames_of_the_same_video() -> None:
    scene = parse_caption("a large green circle moves down-left quickly and a red square moves up")
    long = render(scene, seed=9, n_frames=400, height=64, width=128)
    part = render(scene, seed=9, n_frames=50, height=64, width=128, start=333)
    np.testing.assert_array_equal(part, long[333:383])


def test_objects_start_apart_and_first_is_on_top() -> None:
    rng = np.random.default_rng(0)
    for seed in range(200):  # t = 0: bounding boxes never overlap
        scene = sample_scene(rng, p_two=1.0)
        xy = object_positions(scene, seed=seed, frame_indices=np.array([0]))[:, 0]
        gap = sum(half_extent(o.size, 64) for o in scene.objects)
        assert (np.abs(xy[0] - xy[1]) >= gap).any()
    top = ShapeObject(colour="red", shape="square", direction="right", speed="quickly")
    under = ShapeObject(colour="blue", shape="square", direction="down", size="large")
    for seed in range(50):
        scene = Scene(objects=(top, under))
        xy = object_positions(scene, seed=seed, frame_indices=np.arange(400))
        crossing = np.nonzero((np.abs(xy[0] - xy[1]) <= 2).all(axis=1))[0]
        if len(crossing):
            t = int(crossing[0])
            frame = render(scene, seed=seed, n_frames=1, start=t)[0]
            x, y = xy[0, t]
            assert tuple(frame[y, x]) == PALETTE["red"]  # both cover pixel (y, x)
            return
    pytest.fail("no crossing found in 50 seeds")


def test_render_is_vectorised() -> None:
    scene = parse_caption("a large white circle moves up-right and a cyan triangle moves left")
    frames = render(scene, seed=0, n_frames=1000)  # well under a second: no per-frame loop
    assert frames.shape == (1000, 64, 64, 3)


def test_paraphrase_is_seeded_and_names_every_object() -> None:
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = sample_scene(rng, p_two=0.5)
        a = paraphrase(scene, np.random.default_rng(7))
        assert a == paraphrase(scene, np.random.default_rng(7))
        for obj in scene.objects:
            assert obj.colour in a and obj.shape in a
        still = paraphrase(scene, np.random.default_rng(7), still=True)
        assert not any(d in still.split() for d in DIRECTIONS)


def test_dataset_items() -> None:
    config = ShapesWorldConfig(n_frames=9, seed=3)
    world = ShapesWorld(config)
    text, video = world[5]
    assert video.shape == (3, 9, 64, 64) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0
    assert world[5][0] == text and torch.equal(world[5][1], video)
    assert not torch.equal(ShapesWorld(ShapesWorldConfig(n_frames=9, seed=4))[5][1], video)
    for i in range(20):
        scene, seed, text, frames = world.sample(i)
        assert parse_caption(text) == scene
        np.testing.assert_array_equal(render(scene, seed=seed, n_frames=9), frames)
    stills = ShapesWorld(ShapesWorldConfig(still_prob=1.0))
    for i in range(10):
        scene, seed, text, frames = stills.sample(i)
        assert frames.shape == (1, 64, 64, 3) and scene.still and "moves" not in text
        # A still shows frame 0 of the moving clip drawn from the same item.
        moving = ShapesWorld(ShapesWorldConfig()).sample(i)
        np.testing.assert_array_equal(frames[0], moving[3][0])
    mixed = ShapesWorld(ShapesWorldConfig(paraphrase_prob=1.0, seed=1))
    assert mixed.sample(0)[0] == ShapesWorld(ShapesWorldConfig(seed=1)).sample(0)[0]
    assert len(world) == 2**31 - 1
