"""An invisible, keyed watermark in every frame, found again after H.264 (CRF 18 and 28) and a 2x downscale.

Why not the `invisible-watermark` package: measured here, its encoder and decoder refuse frames under
256x256 pixels ("image too small"), i.e. every size of the default model's grid but 256x256, and it
needs opencv-python, which conflicts with opencv-python-headless. (On 256x256 upscaled shapes clips
its dwtDct mode did read back 32/32 bits after CRF 18.) So this is a small scheme of our own, numpy only.

Scheme: spread spectrum over a grid of cells, one static pattern for the whole clip
-----------------------------------------------------------------------------------
*Pattern.* The frame is cut into a grid: `G` cells across its short side and proportionally many
across the long side (a 96x64 frame at G=16 has 16x24 cells), so the grid is relative to the frame
and a resized copy keeps it. G is the largest of `LEVELS` (16, 24, 32, 48, 64, 96, 128, 192, 256)
that leaves cells of at least 4 px (16 at least, so frames under 64 px get 2..4 px cells): 16 cells
of 4 px at 64x64, 32 at 128x128, 256 cells of 4.2 px at 1920x1080. Each cell gets a sign p = ±1 from
a keyed hash of (key, G, row, column) (splitmix64 over sha256 of the key); the key is `DEFAULT_KEY`
unless REEL_WATERMARK_KEY is set. The frame gets +`AMPLITUDE` grey levels on R, G and B (so on luma
alone; hue is kept) in cells with p = +1 and −AMPLITUDE in the others, clipped to 0..255. The same
pattern goes into every frame: H.264 codes a static pattern once and carries it in skipped and
predicted blocks, and the detector averages it over all frames. Integer arithmetic on a precomputed
field: the same frames give the same bytes. PSNR against the unmarked frames is 20·log10(255/3) =
38.6 dB (a little more where clipping at 0 or 255 drops part of the mark).

*Detector.* Average the BT.709 luma of all frames; take each cell's mean (x); high-pass it on the
cell grid (w = x − the mean of its 3x3 cell neighbourhood: removes backgrounds and gradients); clip
w to ±`CLIP` (1 grey level), which makes it close to a sign detector, so object edges and texture
count no more than any other cell; then

    z = Σ w·p / sqrt(Σ w²)

for every level whose cells are 2 px or larger on the frame at hand (a 2x-downscaled clip keeps its
grid but may now sit at another level's size). The score is the largest z.

*Threshold, and how it was chosen.* On content without the mark, w does not depend on the keyed
signs p, so z is a Rademacher sum with unit-norm weights and Hoeffding's inequality gives
P(z ≥ t) ≤ exp(−t²/2) for any content at all, flat, textured or adversarially chosen without the key.
`THRESHOLD` = 6 makes that ≤ 1.5e-8 per level and ≤ 1.4e-7 over the ≤ 9 levels tried
(`FALSE_POSITIVE_BOUND`). Measured unmarked scores (model renders, procedural clips, natural images)
stay under 3 (max 2.85 over 600 unmarked clips, standard deviation about 0.9, as the bound's unit
scale says). Marked renders of the default model score about 10..18 at 64x64 after CRF 18 (a
perfect copy reaches about sqrt(16·16·8/9) ≈ 15 there; 1 render of 34 in the bench scored 4.1);
more cells score more: ~25 at 128x128, 50..230 on natural video from 256 px to 1080p. So 6 sits
well above the null and below nearly all marked clips; the figures are in `bench/watermark.py`.

Limits: presence only (no payload bits); it does not survive cropping, rotation or a change of
aspect ratio (the grid moves); a 2x downscale of a clip under 64 px (to 16..31 px) loses it; small
*natural* (textured) frames under ~128 px carry too few cells to beat their texture (scores 2..6 at
64..96 px); anyone holding the key can find and subtract it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np

__all__ = ["embed_watermark", "detect_watermark", "watermark_key", "WatermarkResult", "DEFAULT_KEY", "THRESHOLD",
           "AMPLITUDE", "FALSE_POSITIVE_BOUND", "SCHEME"]

DEFAULT_KEY = "reelforge-provenance-v1"
SCHEME = "reelforge-cells-v1"    # the name outputs record in their tags
KEY_ENV = "REEL_WATERMARK_KEY"
LEVELS = (16, 24, 32, 48, 64, 96, 128, 192, 256)  # cells across the frame's short side
MIN_CELL_PX = 4.0               # embedding: the finest level whose cells are at least this wide (16 at least)
MIN_DETECT_CELL_PX = 2.0        # detection: also try finer levels, down to cells this wide (after a downscale)
AMPLITUDE = 3                   # ± grey levels added to R, G and B alike
CLIP = 1.0                      # detector: high-passed cell means are clipped to ±CLIP grey levels
THRESHOLD = 6.0                 # detector: z at or above this means "marked"
FALSE_POSITIVE_BOUND = len(LEVELS) * math.exp(-THRESHOLD ** 2 / 2)
_LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)  # BT.709, as encode_mp4 converts


@dataclass(frozen=True)
class WatermarkResult:
    """What `detect_watermark` found: the score (z, in standard deviations of an unmarked frame's
    worst case), the threshold it is held against, the verdict, and the grid level that scored."""

    detected: bool
    score: float
    threshold: float
    level: int | None
    scores: dict[int, float]

    def as_dict(self) -> dict:
        d = asdict(self)
        d["scores"] = {str(k): v for k, v in self.scores.items()}
        return d


def watermark_key() -> str:
    """The key: REEL_WATERMARK_KEY if set (and not empty), else the project's DEFAULT_KEY."""
    return os.environ.get(KEY_ENV) or DEFAULT_KEY


def _grid(h: int, w: int, level: int) -> tuple[int, int]:
    """Cells (rows, columns) of a `level` grid on an h x w frame: `level` across the short side."""
    short = min(h, w)
    rows = level if h == short else max(1, round(h * level / short))
    cols = level if w == short else max(1, round(w * level / short))
    return rows, cols


def embed_level(h: int, w: int) -> int:
    """The grid level the mark is embedded at on an h x w frame."""
    short = min(h, w)
    fits = [g for g in LEVELS if short / g >= MIN_CELL_PX]  # cells of 2..4 px below a 64 px short side
    return fits[-1] if fits else LEVELS[0]


def _signs(key: str, level: int, rows: int, cols: int) -> np.ndarray:
    """±1 (rows, cols) from a keyed hash of (key, level, row, column): splitmix64 over a key-derived
    seed, vectorised, so a cell's sign does not depend on the grid's other dimension."""
    seed = int.from_bytes(hashlib.sha256(f"{key}\x00{level}".encode()).digest()[:8], "little")
    r = np.arange(rows, dtype=np.uint64)[:, None]
    c = np.arange(cols, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        z = np.uint64(seed) ^ (r * np.uint64(0x9E3779B97F4A7C15)) ^ (c * np.uint64(0xC2B2AE3D27D4EB4F))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.where((z >> np.uint64(63)) == 1, 1.0, -1.0).astype(np.float32)


def _cell_index(size: int, n: int) -> np.ndarray:
    """Cell of each pixel along an axis of `size` pixels cut into `n` cells."""
    return (np.arange(size) * n) // size


@lru_cache(maxsize=16)
def _field(h: int, w: int, key: str) -> np.ndarray:
    """The integer ±field (h, w) added to every frame (int16, read-only)."""
    level = embed_level(h, w)
    rows, cols = _grid(h, w, level)
    p = _signs(key, level, rows, cols)
    f = p[_cell_index(h, rows)][:, _cell_index(w, cols)] * AMPLITUDE
    out = np.rint(f).astype(np.int16)
    out.setflags(write=False)
    return out


def _check(frames) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3) or (H, W, 3), got {frames.shape} {frames.dtype}")
    if frames.shape[0] < 1 or frames.shape[1] < 8 or frames.shape[2] < 8:
        raise ValueError(f"frames must hold at least one 8x8 frame, got shape {frames.shape}")
    return frames


def embed_watermark(frames: np.ndarray, key: str | None = None) -> np.ndarray:
    """Marked copy of uint8 (T, H, W, 3) frames (or one (H, W, 3) frame; the shape is kept).

    Deterministic: the same frames and key give the same bytes. `key` defaults to `watermark_key()`.
    """
    single = np.asarray(frames).ndim == 3
    frames = _check(frames)
    t, h, w, _ = frames.shape
    field = _field(h, w, key or watermark_key())[:, :, None]
    out = np.empty_like(frames)
    for i in range(t):  # one frame at a time: int16 temporaries stay small at 1080p
        out[i] = np.clip(frames[i].astype(np.int16) + field, 0, 255).astype(np.uint8)
    return out[0] if single else out


def _mean_luma(frames: np.ndarray) -> np.ndarray:
    acc = np.zeros(frames.shape[1:3], dtype=np.float64)
    for i in range(0, len(frames), 8):
        acc += (frames[i:i + 8].astype(np.float32) @ _LUMA).sum(axis=0)
    return acc / len(frames)


def _cell_means(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    h, w = img.shape
    rstart = np.searchsorted(_cell_index(h, rows), np.arange(rows))
    cstart = np.searchsorted(_cell_index(w, cols), np.arange(cols))
    sums = np.add.reduceat(np.add.reduceat(img, rstart, axis=0), cstart, axis=1)
    counts = np.diff(np.append(rstart, h))[:, None] * np.diff(np.append(cstart, w))[None, :]
    return sums / counts


def _highpass(x: np.ndarray) -> np.ndarray:
    """x minus the mean of its 3x3 neighbourhood (edges replicated)."""
    pad = np.pad(x, 1, mode="edge")
    rows, cols = x.shape
    box = sum(pad[i:i + rows, j:j + cols] for i in range(3) for j in range(3)) / 9.0
    return x - box


def _z(luma: np.ndarray, level: int, key: str) -> float:
    h, w = luma.shape
    rows, cols = _grid(h, w, level)
    wv = np.clip(_highpass(_cell_means(luma, rows, cols)), -CLIP, CLIP)
    norm = float(np.sqrt(np.sum(wv * wv)))
    if norm < 1e-9:
        return 0.0
    return float(np.sum(wv * _signs(key, level, rows, cols)) / norm)


def detect_watermark(frames: np.ndarray, key: str | None = None) -> WatermarkResult:
    """Look for the mark in uint8 (T, H, W, 3) frames or one (H, W, 3) frame (decoded video, a still).

    The score is the largest z over the grid levels tried; `detected` is score >= THRESHOLD. On
    frames without the mark P(detected) <= FALSE_POSITIVE_BOUND whatever their content.
    """
    frames = _check(frames)
    key = key or watermark_key()
    luma = _mean_luma(frames)
    h, w = luma.shape
    scores = {g: round(_z(luma, g, key), 3) for g in LEVELS if min(h, w) / g >= MIN_DETECT_CELL_PX}
    if not scores:
        return WatermarkResult(False, 0.0, THRESHOLD, None, {})
    level = max(scores, key=scores.get)
    score = scores[level]
    return WatermarkResult(bool(score >= THRESHOLD), score, THRESHOLD, level, scores)
