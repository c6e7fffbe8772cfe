"""The shapes world: coloured shapes moving on a plain background, each clip with a caption.

Implements the contract in ``specs/shapes-world.md`` exactly; this docstring records the choices the
spec leaves open.

- Pixels: pixel (i, j) (row i, column j) covers [j, j+1) × [i, i+1) and has its centre at
  (j + 0.5, i + 0.5). Object centres (x, y) are integers, i.e. pixel corners, so every shape lies in
  the 2s × 2s pixels [x − s, x + s) × [y − s, y + s): a square is exactly 2s wide, a circle is
  symmetric (fill ≈ 0.79) and a triangle fills ≈ 0.5 of its box. Inclusion is tested in doubled
  integer coordinates, so rendering is exact integer arithmetic on every machine.
- Rounding: s = round(n·W/32) and the speed in pixels per frame max(1, round(speed·W/64)) use
  Python's ``round`` (half to even).
- Motion: the centre moves along each axis within [s, W − s] (resp. [s, H − s]); a step that would
  leave it is reflected (closed-form triangle wave), so any frame range renders without simulating
  the frames before it. Speeds are per frame, so ``fps`` labels a clip but does not change pixels.
- Start positions: ``np.random.default_rng(seed)`` draws, per try and per object in caption order,
  x then y uniformly among the allowed integer centres; a try is kept when the bounding boxes are
  disjoint (at most 1000 tries, then the objects go to opposite corners).
- Canonical caption: defaults are left out (``small``, ``slowly``, the ``black`` background).
- Stills: an object with ``direction=None`` is still; ``parse_caption`` of a still caption returns
  such objects and ``caption`` of such a scene gives the still caption.

Axes: T frames, H W pixels, C channels, N objects.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 100, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 200, 210),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "gray": (64, 64, 64),
    "navy": (16, 24, 64),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up-left": (-1, -1),
    "up-right": (1, -1),
    "down-left": (-1, 1),
    "down-right": (1, 1),
}
SPEEDS = {"slowly": 1, "quickly": 2}
"""Pixels per frame at width 64."""
SIZES = {"small": 3, "large": 5}
"""Numerator n of the half-extent s = round(n·W/32)."""

_MAX_TRIES = 1000
_EXAMPLE = "a large blue square moves up-left quickly on a gray background"


def _check_choice(kind: str, value: object, choices: dict | tuple) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}: pick one of {', '.join(choices)}")


@dataclass(frozen=True, kw_only=True)
class ShapeObject:
    """One object of a scene; ``direction=None`` makes it still (still captions name no motion)."""

    colour: str
    shape: str
    direction: str | None
    size: str = "small"
    speed: str = "slowly"

    def __post_init__(self) -> None:
        _check_choice("colour", self.colour, PALETTE)
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("size", self.size, SIZES)
        _check_choice("speed", self.speed, SPEEDS)
        if self.direction is not None:
            _check_choice("direction", self.direction, DIRECTIONS)
        elif self.speed != "slowly":
            raise ValueError(
                f"a still object (direction=None) has no speed, got speed={self.speed!r}: "
                "leave speed at its default or give a direction"
            )


@dataclass(frozen=True, kw_only=True)
class Scene:
    """One or two objects on a background; the first object is drawn on top."""

    objects: tuple[ShapeObject, ...]
    background: str = "black"

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if len(self.objects) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 objects, got {len(self.objects)}")
        if not all(isinstance(o, ShapeObject) for o in self.objects):
            raise ValueError("Scene.objects must hold ShapeObject instances")
        _check_choice("background", self.background, BACKGROUNDS)
        if len({o.direction is None for o in self.objects}) > 1:
            raise ValueError(
                "objects must all move or all be still (a caption cannot mix the two): "
                "give every object a direction, or none"
            )

    @property
    def still(self) -> bool:
        """True when the objects have no direction (a still-image scene)."""
        return self.objects[0].direction is None

    def without_motion(self) -> Scene:
        """The same scene with every object still."""
        objects = tuple(replace(o, direction=None, speed="slowly") for o in self.objects)
        return replace(self, objects=objects)


# ----------------------------------------------------------------------------- captions


def caption(scene: Scene, *, still: bool = False) -> str:
    """The canonical caption; defaults (small, slowly, black) are left out.

    ``still=True`` (or a still scene) drops " moves <direction> [speed]".
    """
    still = still or scene.still
    phrases = []
    for obj in scene.objects:
        words = ["a"] + ([obj.size] if obj.size != "small" else []) + [obj.colour, obj.shape]
        if not still:
            words += ["moves", str(obj.direction)]
            words += [obj.speed] if obj.speed != "slowly" else []
        phrases.append(" ".join(words))
    text = " and ".join(phrases)
    if scene.background != "black":
        text += f" on a {scene.background} background"
    return text


_VERBS = ("moves", "travels", "glides", "goes", "drifts", "is heading", "heads")
_DIRECTION_WORDS = {
    "left": ("left", "to the left", "leftwards"),
    "right": ("right", "to the right", "rightwards"),
    "up": ("up", "upwards", "towards the top"),
    "down": ("down", "downwards", "towards the bottom"),
    "up-left": ("up-left", "up and to the left", "diagonally up-left"),
    "up-right": ("up-right", "up and to the right", "diagonally up-right"),
    "down-left": ("down-left", "down and to the left", "diagonally down-left"),
    "down-right": ("down-right", "down and to the right", "diagonally down-right"),
}
_SPEED_WORDS = {"slowly": ("slowly", "gently", "at a slow pace"), "quickly": ("quickly", "fast")}
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_BACKGROUND_WORDS = {"black": ("black",), "gray": ("gray", "grey"), "navy": ("navy", "dark blue")}


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def paraphrase(scene: Scene, rng: np.random.Generator, *, still: bool = False) -> str:
    """An alternative wording of ``caption(scene, still=still)`` for training augmentation.

    Synonyms for verbs, directions, speeds, sizes and backgrounds; defaults are sometimes spelled
    out ("small", "slowly", "on a black background"). Not meant to parse with ``parse_caption``.
    """
    still = still or scene.still
    phrases = []
    for obj in scene.objects:
        words = [_pick(rng, ("a", "one"))]
        if obj.size == "large" or rng.random() < 0.5:
            words.append(_pick(rng, _SIZE_WORDS[obj.size]))
        words += [obj.colour, obj.shape]
        if not still:
            assert obj.direction is not None
            words += [_pick(rng, _VERBS), _pick(rng, _DIRECTION_WORDS[obj.direction])]
            if obj.speed == "quickly" or rng.random() < 0.5:
                words.append(_pick(rng, _SPEED_WORDS[obj.speed]))
        if words[0] == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        phrases.append(" ".join(words))
    text = _pick(rng, (" and ", ", and ", " while ")).join(phrases)
    if still and rng.random() < 0.3:
        text = _pick(rng, ("a picture of ", "an image of ")) + text
    if scene.background != "black" or rng.random() < 0.3:
        colour = _pick(rng, _BACKGROUND_WORDS[scene.background])
        template = _pick(rng, ("{} on a {} background", "{} against a {} background"))
        text = template.format(text, colour)
    return text


def _object_pattern(prefix: str) -> str:
    def alt(names: Iterable[str]) -> str:  # longest first, so "up-left" is tried before "up"
        return "|".join(sorted(names, key=len, reverse=True))

    return (
        f"an? (?:(?P<{prefix}size>{alt(SIZES)}) )?(?P<{prefix}colour>{alt(PALETTE)}) "
        f"(?P<{prefix}shape>{alt(SHAPES)})"
        f"(?: moves (?P<{prefix}direction>{alt(DIRECTIONS)})"
        f"(?: (?P<{prefix}speed>{alt(SPEEDS)}))?)?"
    )


_CAPTION_RE = re.compile(
    f"{_object_pattern('a_')}(?: and {_object_pattern('b_')})?"
    f"(?: on a (?P<background>{'|'.join(BACKGROUNDS)}) background)?"
)


def parse_caption(text: str) -> Scene:
    """The scene a canonical caption describes; case, extra spaces, "an" and a final "." are fine.

    Absent size/speed/background read as small/slowly/black. A still caption ("a red circle")
    gives objects with ``direction=None``. Raises ValueError for text outside the grammar.
    """
    normal = " ".join(text.lower().split()).removesuffix(".").rstrip()
    match = _CAPTION_RE.fullmatch(normal)
    if match is None:
        raise ValueError(
            f"caption {text!r} is outside the shapes-world grammar: write it like {_EXAMPLE!r} "
            "(object = 'a [small|large] <colour> <shape> [moves <direction> [slowly|quickly]]', "
            "one or two joined by ' and ', then optionally ' on a <black|gray|navy> background')"
        )
    groups = match.groupdict()
    objects = [
        ShapeObject(
            colour=groups[p + "colour"],
            shape=groups[p + "shape"],
            direction=groups[p + "direction"],
            size=groups[p + "size"] or "small",
            speed=groups[p + "speed"] or "slowly",
        )
        for p in ("a_", "b_")
        if groups[p + "colour"] is not None
    ]
    try:
        return Scene(objects=tuple(objects), background=groups["background"] or "black")
    except ValueError as err:
        raise ValueError(f"caption {text!r}: {err}") from err


# ----------------------------------------------------------------------------- rendering


def check_frame_size(height: int, width: int) -> None:
    """Raise ValueError unless H and W are multiples of 16 from 64 up and large shapes fit."""
    for name, value in (("height", height), ("width", width)):
        if value < 64 or value % 16:
            raise ValueError(f"{name} must be a multiple of 16 from 64 up, got {value}: try 64")
    tallest = 2 * half_extent("large", width)
    if height < tallest:
        raise ValueError(
            f"height {height} is too small for width {width}: a large shape is {tallest} pixels "
            f"tall; use height >= {-(-tallest // 16) * 16}"
        )


def half_extent(size: str, width: int) -> int:
    """Half-extent s in pixels of a shape of ``size`` in a frame ``width`` wide."""
    _check_choice("size", size, SIZES)
    return round(SIZES[size] * width / 32)


def pixel_speed(speed: str, width: int) -> int:
    """Pixels per frame of ``speed`` in a frame ``width`` wide (at least 1)."""
    _check_choice("speed", speed, SPEEDS)
    return max(1, round(SPEEDS[speed] * width / 64))


def shape_mask(shape: str, s: int) -> np.ndarray:
    """Pixels a shape of half-extent ``s`` covers within its (2s, 2s) box; bool (2s, 2s)."""
    _check_choice("shape", shape, SHAPES)
    # Doubled coordinates of pixel centres relative to the shape centre: odd integers.
    offsets = 2 * np.arange(2 * s) + 1 - 2 * s
    ys, xs = offsets[:, None], offsets[None, :]
    if shape == "circle":
        return xs * xs + ys * ys <= 4 * s * s
    if shape == "square":
        return np.ones((2 * s, 2 * s), dtype=bool)
    # Triangle: apex (0, -s), base (±s, s); half-width at height y is (y + s) / 2.
    return 2 * np.abs(xs) <= ys + 2 * s


def _bounce(u0: int, velocity: int, span: int, t: np.ndarray) -> np.ndarray:
    """Offsets in [0, span] of a point from u0 at ``velocity`` px/frame, reflected at both ends."""
    if span == 0:
        return np.zeros_like(t)
    m = (u0 + velocity * t) % (2 * span)  # triangle wave of period 2·span
    return np.where(m > span, 2 * span - m, m)


def _start_positions(scene: Scene, *, seed: int, height: int, width: int) -> list[tuple[int, int]]:
    extents = [half_extent(o.size, width) for o in scene.objects]
    rng = np.random.default_rng(seed)
    for _ in range(_MAX_TRIES):
        centres = [
            (int(rng.integers(s, width - s + 1)), int(rng.integers(s, height - s + 1)))
            for s in extents
        ]
        if len(centres) == 1:
            return centres
        (x1, y1), (x2, y2) = centres
        gap = extents[0] + extents[1]
        if abs(x1 - x2) >= gap or abs(y1 - y2) >= gap:
            return centres
    # Unreachable in practice; opposite corners never overlap because 2(s1 + s2) < W.
    return [(extents[0], extents[0]), (width - extents[1], height - extents[1])]


def object_positions(
    scene: Scene, *, seed: int, frame_indices: np.ndarray, height: int = 64, width: int = 64
) -> np.ndarray:
    """Integer centres (x, y) of every object at frame_indices (T,); int64 (N, T, 2)."""
    check_frame_size(height, width)
    t = np.asarray(frame_indices, dtype=np.int64)
    out = np.empty((len(scene.objects), len(t), 2), dtype=np.int64)
    starts = _start_positions(scene, seed=seed, height=height, width=width)
    for k, (obj, (x0, y0)) in enumerate(zip(scene.objects, starts, strict=True)):
        s = half_extent(obj.size, width)
        v = pixel_speed(obj.speed, width)
        dx, dy = DIRECTIONS[obj.direction] if obj.direction is not None else (0, 0)
        out[k, :, 0] = s + _bounce(x0 - s, v * dx, width - 2 * s, t)
        out[k, :, 1] = s + _bounce(y0 - s, v * dy, height - 2 * s, t)
    return out


def render(
    scene: Scene,
    *,
    seed: int,
    n_frames: int,
    height: int = 64,
    width: int = 64,
    fps: float = 8.0,
    start: int = 0,
) -> np.ndarray:
    """Frames start .. start + n_frames − 1 of the scene's (endless) video; uint8 (T, H, W, 3).

    A pure function of its inputs, bit for bit. ``fps`` is validated but changes no pixel (speeds
    are per frame).
    """
    check_frame_size(height, width)
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    t = np.arange(start, start + n_frames)
    centres = object_positions(scene, seed=seed, frame_indices=t, height=height, width=width)
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    frames[:] = BACKGROUNDS[scene.background]
    # Last-named first, so the first-named object ends up on top.
    for obj, xy in reversed(list(zip(scene.objects, centres, strict=True))):
        s = half_extent(obj.size, width)
        rows, cols = np.nonzero(shape_mask(obj.shape, s))  # (P,) offsets inside the box
        ii = xy[:, 1, None] - s + rows[None, :]  # (T, P)
        jj = xy[:, 0, None] - s + cols[None, :]
        frames[np.arange(n_frames)[:, None], ii, jj] = PALETTE[obj.colour]
    return frames


# ----------------------------------------------------------------------------- sampling


def sample_scene(rng: np.random.Generator, *, max_objects: int = 2, p_two: float = 0.3) -> Scene:
    """A random moving scene: 2 objects (distinct colours) with probability ``p_two`` if allowed."""
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
    if not 0.0 <= p_two <= 1.0:
        raise ValueError(f"p_two must be in [0, 1], got {p_two}")
    n = 2 if rng.random() < p_two and max_objects == 2 else 1
    colours = rng.choice(list(PALETTE), size=n, replace=False)
    objects = tuple(
        ShapeObject(
            colour=str(colour),
            shape=_pick(rng, SHAPES),
            direction=_pick(rng, tuple(DIRECTIONS)),
            size=_pick(rng, tuple(SIZES)),
            speed=_pick(rng, tuple(SPEEDS)),
        )
        for colour in colours
    )
    return Scene(objects=objects, background=_pick(rng, tuple(BACKGROUNDS)))


@dataclass(kw_only=True)
class ShapesWorldConfig:
    """What the ShapesWorld dataset generates."""

    height: int = 64
    """Frame height in pixels: a multiple of 16 from 64 up."""
    width: int = 64
    """Frame width in pixels: a multiple of 16 from 64 up; sizes and speeds scale with it."""
    fps: float = 8.0
    """Frame rate the clips are labelled with."""
    n_frames: int = 17
    """Frames per video item (stills have 1)."""
    max_objects: int = 2
    """At most this many objects per scene: 1 or 2."""
    p_two: float = 0.3
    """Probability of a two-object scene when max_objects is 2."""
    paraphrase_prob: float = 0.0
    """Share of items captioned by a paraphrase instead of the canonical caption."""
    still_prob: float = 0.0
    """Share of items that are 1-frame stills with still captions."""
    seed: int = 0
    """Item i is a pure function of (seed, i)."""

    def __post_init__(self) -> None:
        check_frame_size(self.height, self.width)
        if self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {self.n_frames}: try 17")
        if self.max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {self.max_objects}")
        for name in ("p_two", "paraphrase_prob", "still_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


class ShapesWorld(Dataset):
    """An endless dataset of (caption, video) items from the shapes world.

    With ``still_prob > 0`` items have 1 or ``n_frames`` frames, so batch them with a collate that
    groups by length (or batch size 1).
    """

    def __init__(self, config: ShapesWorldConfig) -> None:
        self.config = config

    def __len__(self) -> int:
        return 2**31 - 1

    def sample(self, index: int) -> tuple[Scene, int, str, np.ndarray]:
        """Item ``index`` as (scene, render seed, caption, frames uint8 (T, H, W, 3)).

        For stills the scene is ``without_motion()``, so ``render(scene, seed=seed, n_frames=1)``
        reproduces the frame and ``caption(scene)`` is its canonical caption.
        """
        if not 0 <= index < len(self):
            raise IndexError(f"index must be in [0, {len(self)}), got {index}")
        c = self.config
        rng = np.random.default_rng([c.seed, index])
        scene = sample_scene(rng, max_objects=c.max_objects, p_two=c.p_two)
        # Every draw happens whatever the probabilities, so items stay stable across settings.
        still = bool(rng.random() < c.still_prob)
        use_paraphrase = bool(rng.random() < c.paraphrase_prob)
        seed = int(rng.integers(2**31))
        if still:
            scene = scene.without_motion()
        text = paraphrase(scene, rng) if use_paraphrase else caption(scene)
        n_frames = 1 if still else c.n_frames
        frames = render(
            scene, seed=seed, n_frames=n_frames, height=c.height, width=c.width, fps=c.fps
        )
        return scene, seed, text, frames

    def __getitem__(self, index: int) -> tuple[str, torch.Tensor]:
        """(caption, video float (C, T, H, W) in [−1, 1])."""
        _, _, text, frames = self.sample(index)
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float()  # (C, T, H, W)
        return text, video / 127.5 - 1.0
