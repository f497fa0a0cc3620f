"""A judge of shapes-world clips that looks only at pixels (docs/SHAPES_WORLD.md "Adherence").

For one clip (uint8 or float frames, T x H x W x 3, sRGB):

* background: the per-channel median of every frame's one-pixel border, named by the nearest
  background colour;
* object: a first, coarse mask of the pixels far (> `COARSE_DISTANCE`) from that background colour
  gives the object's colour (their median); the final mask is then the pixels that lie more than
  half-way from the background colour to the object colour (the 50% coverage line of an
  anti-aliased or blurred edge), cut to each frame's largest 4-connected component (stray specks
  of a model's output are dropped). A frame shows the object when that component has at least
  `min_visible_pixels(H, W)` pixels; `visible_frames` is the share of frames that do;
* colour: the median of the mask's inner pixels (>= 75% of the way to the object colour, which
  keeps blurred edges out), named by the nearest object colour;
* motion: centroid and area averaged over the first two and the last two visible frames. The
  displacement is measured in fractions of the frame's width (x) or height (y). Thresholds are
  looser than the contract so that imperfect model output that clearly does the right thing still
  passes, while an opposite or absent motion never does:
    - a move needs >= `MOVE_THRESHOLD` (0.15; the contract's motions move >= 0.40),
    - a scale change needs an area ratio >= `SCALE_THRESHOLD` (1.6; the contract's >= 2.5),
    - when both qualify, the one larger relative to its contract minimum wins,
    - still needs a move < `STILL_MOVE` (0.06; the contract's < 0.03) and an area ratio within
      `STILL_SCALE` (1.25),
    - anything between still and moving is "unclear": motion None, never adherent;
* shape: in the `SHAPE_FRAMES` visible frames where the object is largest, each of the four shapes
  is fitted to the object (same centroid, its soft coverage's area, the mask's bounding-box aspect
  ratio) and scored by soft intersection over union against the object's coverage, taking the
  best of a few Gaussian blurs of the template (so a blurred diamond — a JPEG's or H.264's
  half-resolution chroma — does not read as a circle); the best mean score names the shape. A
  circle fills ~0.785 of its box, a square ~1.0, a diamond and a triangle ~0.5 — the diamond with
  its vertices at the box's edge midpoints, the triangle with its apex up and its centroid a third
  of the way below the box's centre — so fitted templates separate all four, even for 9-pixel
  objects under blur and noise, and for objects stretched by a third in either direction.

When no frame shows the object, the clip is "not visible": `visible_frames` is 0 and shape,
colour and motion are None (the background is still judged).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from models.shapes.world import (
    ATTRIBUTES,
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    SHAPES,
    Scene,
    coverage,
    shape_area_factor,
    shape_centroid_offset,
)

COARSE_DISTANCE = 48.0   # sRGB distance from the background for the coarse object mask
MIN_CONTRAST = 40.0      # an "object colour" closer than this to the background means no object
MOVE_THRESHOLD = 0.15
SCALE_THRESHOLD = 1.6
STILL_MOVE = 0.06
STILL_SCALE = 1.25
CONTRACT_MOVE = 0.40
CONTRACT_SCALE = 2.5
SOFT_LOW = 0.15          # soft coverage: 0 below this share of the way to the object colour
WINDOW_PAD = 3           # pixels around the object's box in which its shape is scored
TEMPLATE_BLURS = (0.0, 0.7, 1.2, 1.7)  # Gaussian sigmas (pixels) tried on each shape template
SHAPE_FRAMES = 6         # the shape is judged in this many frames where the object is largest

_BG_NAMES = tuple(BACKGROUNDS)
_BG_RGB = np.array([BACKGROUNDS[n] for n in _BG_NAMES], dtype=np.float32)
_FG_NAMES = tuple(COLOURS)
_FG_RGB = np.array([COLOURS[n] for n in _FG_NAMES], dtype=np.float32)


def min_visible_pixels(height: int, width: int) -> int:
    """Fewest mask pixels that count as the object being visible in a frame."""
    return max(6, int(round(0.0015 * height * width)))


@dataclass
class JudgeResult:
    shape: str | None
    colour: str | None
    background: str | None
    motion: str | None
    visible_frames: float                       # share of frames in which the object is visible
    details: dict = field(default_factory=dict, compare=False, repr=False)  # measurements

    @property
    def visible(self) -> bool:
        return self.visible_frames > 0.0


def _nearest(rgb: np.ndarray, names: tuple[str, ...], table: np.ndarray) -> str:
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def _largest_component(m: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a 2-D bool mask (runs of each row, union-find)."""
    h, w = m.shape
    d = np.diff(np.pad(m, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    r_start, c_start = np.nonzero(d == 1)
    _, c_end = np.nonzero(d == -1)           # same row order, one end per start
    n = len(r_start)
    if n <= 1:
        return m.copy()
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rows, starts, ends = r_start.tolist(), c_start.tolist(), c_end.tolist()
    prev_lo = prev_hi = cur_lo = 0          # runs of the previous row: [prev_lo, prev_hi)
    for i in range(n):
        if i == 0 or rows[i] != rows[i - 1]:
            prev_lo, prev_hi = (cur_lo, i) if i and rows[i - 1] == rows[i] - 1 else (i, i)
            cur_lo = i
        for j in range(prev_lo, prev_hi):
            if starts[j] < ends[i] and starts[i] < ends[j]:
                a, b = find(i), find(j)
                if a != b:
                    parent[a] = b
    roots = np.array([find(i) for i in range(n)])
    sizes = np.bincount(roots, weights=np.array(ends) - np.array(starts), minlength=n)
    keep = roots == int(np.argmax(sizes))
    out = np.zeros_like(m)
    for r, a, b in zip(r_start[keep].tolist(), c_start[keep].tolist(), c_end[keep].tolist()):
        out[r, a:b] = True
    return out


@lru_cache(maxsize=512)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) matrix of a 1-D Gaussian blur with zeros beyond the edges."""
    i = np.arange(n)
    k = np.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2)
    return k / k.sum(axis=1, keepdims=True).max()  # interior rows sum to 1


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return img
    h, w = img.shape
    return _blur_matrix(h, sigma) @ img @ _blur_matrix(w, sigma).T


def _soft(proj: np.ndarray) -> np.ndarray:
    """Coverage from the projection, with a dead zone that keeps pixel noise out of the mass."""
    return np.clip((proj - SOFT_LOW) / (1.0 - 2 * SOFT_LOW), 0.0, 1.0)


def _shape_scores(masks: np.ndarray, projs: np.ndarray) -> dict[str, float]:
    """Mean soft IoU of each shape's template fitted to each frame's object.

    Per frame, in a window around the object: the template has the mask's centroid, the soft mass
    as its area and the mask's bounding-box aspect; it is compared, after a Gaussian blur of
    each of `TEMPLATE_BLURS` (the best one counts), with the object's soft coverage. Blurring the
    template is what keeps a blurred diamond (a JPEG's or H.264's 4:2:0 chroma) from reading
    as a circle.
    """
    k, h, w = masks.shape
    scores = {s: 0.0 for s in SHAPES}
    for i in range(k):
        m = masks[i]
        rows, cols = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        y0, y1 = max(rows[0] - WINDOW_PAD, 0), min(rows[-1] + 1 + WINDOW_PAD, h)
        x0, x1 = max(cols[0] - WINDOW_PAD, 0), min(cols[-1] + 1 + WINDOW_PAD, w)
        near = m[y0:y1, x0:x1].copy()
        for _ in range(WINDOW_PAD):       # grow the component to take in its soft edge only
            g = near.copy()
            g[1:] |= near[:-1]
            g[:-1] |= near[1:]
            g[:, 1:] |= near[:, :-1]
            g[:, :-1] |= near[:, 1:]
            near = g
        soft = _soft(projs[i, y0:y1, x0:x1]) * near
        area = float(soft.sum())
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64) + 0.5
        cx, cy = float((xs * soft).sum() / area), float((ys * soft).sum() / area)
        aspect = (cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1)
        for s in SHAPES:
            hxy = area / shape_area_factor(s)
            hx, hy = np.sqrt(hxy * aspect), np.sqrt(hxy / aspect)
            cov = coverage(s, x1 - x0, y1 - y0, [cx - x0], [cy - y0 - shape_centroid_offset(s) * hy],
                           [hx], [hy])[0].astype(np.float64)
            best = 0.0
            for sigma in TEMPLATE_BLURS:
                t = _soft(_gaussian_blur(cov, sigma))
                best = max(best, float(np.minimum(t, soft).sum() / np.maximum(t, soft).sum()))
            scores[s] += best / k
    return scores


def _motion(cx, cy, area, width: int, height: int) -> tuple[str | None, dict]:
    n = len(area)
    k = 2 if n >= 4 else 1
    dx = (np.mean(cx[-k:]) - np.mean(cx[:k])) / width
    dy = (np.mean(cy[-k:]) - np.mean(cy[:k])) / height
    ratio = float(np.mean(area[-k:]) / np.mean(area[:k]))
    move = max(abs(dx), abs(dy))
    scale = max(ratio, 1.0 / ratio)
    info = {"dx": float(dx), "dy": float(dy), "area_ratio": ratio}
    moving, scaling = move >= MOVE_THRESHOLD, scale >= SCALE_THRESHOLD
    if moving or scaling:
        move_score = move / CONTRACT_MOVE if moving else -1.0
        scale_score = np.log(scale) / np.log(CONTRACT_SCALE) if scaling else -1.0
        if move_score >= scale_score:
            if abs(dx) >= abs(dy):
                return ("right" if dx > 0 else "left"), info
            return ("down" if dy > 0 else "up"), info
        return ("grows" if ratio > 1 else "shrinks"), info
    if move < STILL_MOVE and scale < STILL_SCALE:
        return "still", info
    return None, info


def judge_clip(frames: np.ndarray) -> JudgeResult:
    """What a clip shows, from its pixels alone (see the module docstring)."""
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3), got {x.shape}")
    t, h, w, _ = x.shape
    border = np.concatenate([x[:, 0].reshape(-1, 3), x[:, -1].reshape(-1, 3),
                             x[:, :, 0].reshape(-1, 3), x[:, :, -1].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    background = _nearest(bg, _BG_NAMES, _BG_RGB)
    none = JudgeResult(None, None, background, None, 0.0, {"background_rgb": bg.tolist()})

    diff = x - bg
    coarse = np.sqrt((diff ** 2).sum(axis=-1)) > COARSE_DISTANCE
    if coarse.sum() < min_visible_pixels(h, w):
        return none
    fg = np.median(x[coarse], axis=0)
    axis = fg - bg
    contrast = float(np.sqrt((axis ** 2).sum()))
    if contrast < MIN_CONTRAST:
        return none
    proj = (diff @ axis) / (contrast ** 2)          # 0 at the background colour, 1 at the object's
    mask = np.stack([_largest_component(f) for f in proj > 0.5])
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    visible = area >= min_visible_pixels(h, w)
    if not visible.any():
        return none
    vis = np.nonzero(visible)[0]

    inner = mask & (proj >= 0.75)
    pix = x[inner] if inner.sum() >= 4 else x[mask]
    obj_rgb = np.median(pix, axis=0)
    colour = _nearest(obj_rgb, _FG_NAMES, _FG_RGB)

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    cx = np.array([xs[mask[i]].mean() for i in vis])
    cy = np.array([ys[mask[i]].mean() for i in vis])
    motion, info = _motion(cx, cy, area[vis], w, h)

    top = vis[np.argsort(-area[vis], kind="stable")[:SHAPE_FRAMES]]
    scores = _shape_scores(mask[top], proj[top])
    shape = max(scores, key=scores.get)

    details = {"background_rgb": bg.tolist(), "object_rgb": obj_rgb.tolist(), "shape_iou": scores,
               "visible": visible.tolist(), **info}
    return JudgeResult(shape, colour, background, motion, float(visible.mean()), details)


Target = Scene | Mapping[str, str | None]


def expected_attributes(target: Target) -> dict[str, str]:
    """The attributes a clip is judged on: all four of a Scene; of a mapping (a user's prompt with
    its intended attributes), those it names (None or absent: the user left it open)."""
    if isinstance(target, Scene):
        return target.as_dict()
    return {a: target[a] for a in ATTRIBUTES if target.get(a) is not None}


def is_held_out(target: Target) -> bool | None:
    """Whether the target's colour-shape pair is held out from training; None when the target
    does not name both."""
    want = expected_attributes(target)
    if "colour" not in want or "shape" not in want:
        return None
    return (want["colour"], want["shape"]) in HELD_OUT


def adherence(result: JudgeResult, target: Target) -> dict[str, bool]:
    """Attribute -> whether the judge found the target's value in the clip (named attributes only)."""
    return {a: getattr(result, a) == v for a, v in expected_attributes(target).items()}


def _summary(pairs: list[tuple[JudgeResult, Target]]) -> dict:
    n = len(pairs)
    if n == 0:
        return {"clips": 0}
    found = [adherence(r, s) for r, s in pairs]
    per_attr = {}
    for a in ATTRIBUTES:
        judged = [f[a] for f in found if a in f]
        if judged:
            per_attr[a] = sum(judged) / len(judged)
    scored = [f for f in found if f]
    return {
        "clips": n,
        "attributes": per_attr,
        "adherence": sum(sum(f.values()) / len(f) for f in scored) / max(len(scored), 1),
        "all_attributes": sum(all(f.values()) for f in scored) / max(len(scored), 1),
        "permanence": sum(r.visible_frames for r, _ in pairs) / n,
    }


def aggregate(results: Iterable[JudgeResult], targets: Iterable[Target]) -> dict:
    """Adherence over clips: per-attribute adherence (over the clips whose target names that
    attribute), mean adherence (share of named attributes found, averaged over clips), the share
    of clips with every named attribute right, and permanence (share of frames with the object
    visible, averaged over clips) — for all clips and, apart, for the held-in and held-out
    colour-shape pairs (targets naming both)."""
    pairs = list(zip(results, targets, strict=True))
    return {
        **_summary(pairs),
        "held_in": _summary([p for p in pairs if is_held_out(p[1]) is False]),
        "held_out": _summary([p for p in pairs if is_held_out(p[1])]),
    }


def judge_clips(clips: Sequence[np.ndarray], scenes: Sequence[Scene]) -> dict:
    """Judge each clip against its scene and aggregate."""
    return aggregate([judge_clip(c) for c in clips], scenes)
