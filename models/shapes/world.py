"""The shapes world (docs/SHAPES_WORLD.md) as code: its vocabulary, one scene, the canonical
caption, and a procedural renderer that obeys the contract.

One clip is one object on a plain background with a static camera. The renderer draws the object
analytically at 4x4 sub-pixel samples per pixel (anti-aliased edges) and randomises the start
position, the size and the speed within the contract:

* the object is fully inside the frame in every frame (so visible the whole clip), with a one
  pixel margin;
* left/right/up/down move its centre by 45%..80% of the frame's width (or height), at constant
  speed;
* grows/shrinks change its linear size by 1.7x..2.6x (area 2.9x..6.8x) about a fixed centre;
* still does not move it at all.

The generator of training data, the recaptioner and the judge (`models.shapes.judge`) all take their
words and colours from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 230),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "gray": (120, 120, 120),
    "navy": (20, 25, 70),
    "brown": (90, 60, 30),
}
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still", "grows", "shrinks")
# (colour, shape) pairs never seen in training, with any motion or background.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {("green", "triangle"), ("orange", "diamond"), ("purple", "square"), ("yellow", "circle")})

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "background", "motion")
VOCABULARY: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "background": tuple(BACKGROUNDS), "motion": MOTIONS}

# Contract limits (SHAPES_WORLD.md "One clip") and the renderer's own, stricter, ranges.
MIN_MOVE = 0.40          # centre displacement, fraction of the frame's width (height)
MIN_AREA_RATIO = 2.5     # grows / shrinks
MAX_STILL_MOVE = 0.03    # still
_MOVE_RANGE = (0.45, 0.80)       # displacement drawn from this range (fraction of width/height)
_MOVER_SIZE = (0.15, 0.22)       # half-extent of a moving object, fraction of min(width, height)
_STILL_SIZE = (0.15, 0.26)
_SCALE_START = (0.09, 0.13)      # half-extent of the small end of grows/shrinks
_SCALE_FACTOR = (1.7, 2.6)       # linear size change of grows/shrinks (area: square of it)
_MARGIN = 1.0                    # pixels kept clear between the object and the frame's edge
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    motion: str

    def __post_init__(self):
        for attr in ATTRIBUTES:
            value = getattr(self, attr)
            if value not in VOCABULARY[attr]:
                raise ValueError(f"unknown {attr} {value!r} (known: {', '.join(VOCABULARY[attr])})")

    @property
    def held_out(self) -> bool:
        """Whether this colour-shape pair is held out from training."""
        return (self.colour, self.shape) in HELD_OUT

    def as_dict(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in ATTRIBUTES}


# ---------------------------------------------------------------------------------------------
# Captions

# One motion phrase per motion, each with words of its own ("leftward", "falling"): the text
# encoder's states for "from the left to the right" and "from the right to the left" are nearly
# the same set of vectors (cosine 0.9996 pooled), so word order alone is too weak a signal.
_MOTION_PHRASES: dict[str, str] = {
    "left": "moves left, sliding leftward across the frame",
    "right": "moves right, sliding rightward across the frame",
    "up": "moves up, rising upward across the frame",
    "down": "moves down, falling downward across the frame",
    "still": "stays still, resting motionless in the frame",
    "grows": "grows, expanding larger in the frame",
    "shrinks": "shrinks, contracting smaller in the frame",
}


def canonical_caption(scene: Scene) -> str:
    """The one caption style the model is trained on, e.g. "A green circle moves right, sliding
    rightward across the frame, on a plain navy background. The camera is static." """
    article = "An" if scene.colour[0] in "aeiou" else "A"
    return (f"{article} {scene.colour} {scene.shape} {_MOTION_PHRASES[scene.motion]}, "
            f"on a plain {scene.background} background. The camera is static.")


def all_scenes(include_held_out: bool = True) -> Iterator[Scene]:
    """Every scene of the world (784 with the held-out pairs, 672 without), in a fixed order."""
    for shape in SHAPES:
        for colour in COLOURS:
            if not include_held_out and (colour, shape) in HELD_OUT:
                continue
            for background in BACKGROUNDS:
                for motion in MOTIONS:
                    yield Scene(shape, colour, background, motion)


_CAPTION_INDEX: dict[str, Scene] | None = None


def scene_from_caption(caption: str) -> Scene:
    """The scene a canonical caption describes (the exact inverse of `canonical_caption`);
    ValueError for any other text."""
    global _CAPTION_INDEX
    if _CAPTION_INDEX is None:
        _CAPTION_INDEX = {canonical_caption(s): s for s in all_scenes()}
    try:
        return _CAPTION_INDEX[caption]
    except KeyError:
        raise ValueError(f"not a canonical shapes-world caption: {caption!r}") from None


def sample_scenes(rng: np.random.Generator | int, n: int, include_held_out: bool = False,
                  held_out_only: bool = False) -> list[Scene]:
    """`n` scenes drawn uniformly (with replacement) from the world; the held-out colour-shape
    pairs only when `include_held_out`, nothing else when `held_out_only`."""
    rng = np.random.default_rng(rng)
    pool = [s for s in all_scenes(include_held_out or held_out_only) if s.held_out or not held_out_only]
    return [pool[i] for i in rng.integers(0, len(pool), size=n)]


# ---------------------------------------------------------------------------------------------
# Geometry (shared with the judge's shape templates)

def shape_inside(shape: str, x: np.ndarray, y: np.ndarray, cx, cy, hx, hy) -> np.ndarray:
    """Whether points (x, y) (pixel units, y down) lie inside `shape` whose bounding box is centred
    on (cx, cy) with half-extents (hx, hy). Arrays broadcast; the triangle has its apex up."""
    u = (x - cx) / hx
    v = (y - cy) / hy
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":  # apex (0, -1), base corners (-1, 1) and (1, 1)
        return (v <= 1.0) & (2.0 * np.abs(u) <= v + 1.0)
    raise ValueError(f"unknown shape {shape!r}")


def shape_area_factor(shape: str) -> float:
    """Area of `shape` over hx * hy."""
    return {"circle": math.pi, "square": 4.0, "diamond": 2.0, "triangle": 2.0}[shape]


def shape_centroid_offset(shape: str) -> float:
    """Vertical offset of the shape's centroid from its bounding-box centre, in units of hy."""
    return 1.0 / 3.0 if shape == "triangle" else 0.0


def coverage(shape: str, width: int, height: int, cx: np.ndarray, cy: np.ndarray,
             hx: np.ndarray, hy: np.ndarray, supersample: int = _SUPERSAMPLE) -> np.ndarray:
    """Per-pixel coverage in [0, 1], float32 (T, H, W), of one shape per frame: cx, cy, hx, hy are
    arrays of length T (pixel units; pixel (i, j) spans [j, j+1] x [i, i+1])."""
    s = supersample
    offsets = (np.arange(s, dtype=np.float32) + 0.5) / s
    xs = (np.arange(width, dtype=np.float32)[:, None] + offsets).reshape(-1)    # (W*s,)
    ys = (np.arange(height, dtype=np.float32)[:, None] + offsets).reshape(-1)   # (H*s,)
    col = lambda a: np.asarray(a, dtype=np.float32).reshape(-1, 1, 1)  # noqa: E731
    inside = shape_inside(shape, xs[None, None, :], ys[None, :, None], col(cx), col(cy), col(hx), col(hy))
    t = inside.shape[0]
    return inside.reshape(t, height, s, width, s).mean(axis=(2, 4), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Rendering

def _trajectory(scene: Scene, width: int, height: int, frames: int, rng: np.random.Generator):
    """Per-frame centre (cx, cy) and half-extent h, drawn within the contract."""
    short = min(width, height)
    m = _MARGIN
    t = np.linspace(0.0, 1.0, frames)
    if scene.motion in ("left", "right", "up", "down"):
        h = rng.uniform(*_MOVER_SIZE) * short
        horizontal = scene.motion in ("left", "right")
        along, across = (width, height) if horizontal else (height, width)
        span = along - 2 * (h + m)                       # room for the centre along the motion
        dist = rng.uniform(_MOVE_RANGE[0] * along, min(_MOVE_RANGE[1] * along, span))
        start = rng.uniform(h + m, along - h - m - dist)
        pos = start + dist * t
        if scene.motion in ("left", "up"):
            pos = along - pos
        other = np.full(frames, rng.uniform(h + m, across - h - m))
        cx, cy = (pos, other) if horizontal else (other, pos)
        hs = np.full(frames, h)
    elif scene.motion == "still":
        h = rng.uniform(*_STILL_SIZE) * short
        cx = np.full(frames, rng.uniform(h + m, width - h - m))
        cy = np.full(frames, rng.uniform(h + m, height - h - m))
        hs = np.full(frames, h)
    else:  # grows / shrinks: size changes geometrically about a fixed centre
        h0 = rng.uniform(*_SCALE_START) * short
        h1 = h0 * rng.uniform(*_SCALE_FACTOR)
        hs = h0 * (h1 / h0) ** t
        if scene.motion == "shrinks":
            hs = hs[::-1]
        cx = np.full(frames, rng.uniform(h1 + m, width - h1 - m))
        cy = np.full(frames, rng.uniform(h1 + m, height - h1 - m))
    return cx, cy, hs


def render_scene(scene: Scene, *, width: int = 64, height: int = 64, frames: int = 16,
                 rng: np.random.Generator | int) -> np.ndarray:
    """One clip of `scene`: uint8 (frames, height, width, 3), sRGB, anti-aliased.

    Start position, size and speed are drawn from `rng` (a Generator or a seed); the same rng
    state gives the same clip.
    """
    if width < 32 or height < 32:
        raise ValueError(f"frame {width}x{height} is too small (32x32 at least)")
    if frames < 2:
        raise ValueError("need 2 frames or more")
    rng = np.random.default_rng(rng)
    cx, cy, hs = _trajectory(scene, width, height, frames, rng)
    alpha = coverage(scene.shape, width, height, cx, cy, hs, hs)[..., None]
    bg = np.asarray(BACKGROUNDS[scene.background], dtype=np.float32)
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    out = bg + alpha * (fg - bg)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
