"""Face blurring for rendered clips: find faces in every frame and blur them beyond recovery.

    blurred, n = blur_faces(frames)        # uint8 (T, H, W, 3) in, a blurred copy + detections out

The detector is OpenCV's Viola-Jones Haar cascades, which ship inside the opencv-python-headless
wheel (`cv2.data.haarcascades`; OpenCV 5 moved them out, hence the `<5` pin): the frontal-face
cascade plus the profile cascade run on the frame and on its mirror image (the profile cascade only
knows faces turned one way). Nothing is downloaded; the cascades are loaded once per process and
thread (`_cascades`), so a Ray actor pays for them on its first clip only.

How a clip is processed:

1. **Detect** on each frame's grey image. Renders are often 64x64, where a face is ~10 px, well
   below the cascades' 20-24 px window, so frames whose shorter side is under `detect_side` (256)
   are upscaled to it (bicubic): faces down to ~6 px are found at 64x64. Bigger frames are searched
   at their own size (faces from 24 px), up to a shorter side of `max_detect_side` (720). Boxes
   found by several cascades are merged. `min_neighbors` (how many overlapping window hits make a
   detection) trades recall against false positives. Measured with the defaults (5): scikit-image's
   `lfw_subset` faces (25x25, placed in 64x64 frames) 98/100 found, its 100 non-face patches 0;
   the test photograph's face found in every frame at 256x256 and 64x64 (~15 px); shapes-world clips
   (flat shapes on plain backgrounds) 0 detections in 3200 frames at 64x64 and 640 at 256x256
   (in a 960-frame sample: 6 at min_neighbors 3, 1 at 4, 0 at 5 and 6). The only natural-image hits
   seen were the portrait heads on the coins in `skimage.data.coins()`.
2. **Track** detections across frames (overlap or near centres), **interpolate** a box on frames
   between two detections of one track, and **extend** each track `temporal_radius` frames past its
   ends (held and moved on at the track's speed), so a face the detector misses on a frame or two,
   or at the clip's ends, does not flash through.
3. **Blur** each box, enlarged by `margin` of its size on every side (hair, chin, ears), by
   reducing it to a `cells` x `cells` grid (area average) and scaling back up smoothly: only
   cells² colours survive per box, so the face cannot be recovered, and the result has no edges for
   the detector to find again. Pixels outside the boxes are copied unchanged.

Deterministic: the same frames and settings give the same bytes (boxes are sorted; OpenCV's
cascade and resize are deterministic). Cost, CPU time per 16-frame clip on this project's 2-core
development machine (under load): ~0.6 s for a shapes-world clip and ~1.5-2.2 s for a clip with the
photograph, at 64x64 and at 256x256 alike (both are searched at 256 px); the profile cascade, run
twice, is about two thirds of it (`profile=False` to drop it). Bigger frames cost about in
proportion to their area, up to `max_detect_side`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from pipeline.media.encode import check_frames

__all__ = ["blur_faces", "detect_faces", "blur_boxes", "FaceBlurSettings", "DEFAULT_SETTINGS"]


@dataclass(frozen=True)
class FaceBlurSettings:
    """Every knob of `blur_faces`; the defaults are the ones the tests check.

    detect_side: frames whose shorter side is below this are upscaled to it for detection; the
        smallest face found is then min_size / detect_side of the shorter side (6 px at 64x64).
    max_detect_side: frames whose shorter side is above this are downscaled to it; between the two,
        detection runs at the frame's own size (smallest face: min_size pixels).
    scale_factor: step between the cascade's window sizes (smaller finds more, slower).
    min_neighbors: overlapping hits needed for a detection (higher: fewer false positives).
    min_size: smallest face searched for, in pixels of the rescaled image (the cascades' window
        is 20-24 px).
    profile: also run the profile cascade (and on the mirrored frame).
    margin: each box grows by this fraction of its width/height on every side before blurring.
    temporal_radius: frames a track is extended past its first and last detection.
    max_gap: two detections at most this many frames apart can belong to one track (frames
        between them get an interpolated box).
    cells: the blurred box keeps this many area-averaged cells across (and down).
    """

    detect_side: int = 256
    max_detect_side: int = 720
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 24
    profile: bool = True
    margin: float = 0.4
    temporal_radius: int = 2
    max_gap: int = 8
    cells: int = 4

    def __post_init__(self):
        if not 32 <= self.detect_side <= 4096:
            raise ValueError(f"detect_side must be in 32..4096, got {self.detect_side}")
        if not self.detect_side <= self.max_detect_side <= 4096:
            raise ValueError(f"max_detect_side must be in detect_side..4096, got {self.max_detect_side}")
        if not 1.01 <= self.scale_factor <= 2.0:
            raise ValueError(f"scale_factor must be in 1.01..2.0, got {self.scale_factor}")
        if self.min_neighbors < 0 or self.min_size < 8 or self.margin < 0 or self.temporal_radius < 0 \
                or self.max_gap < 1 or self.cells < 1:
            raise ValueError("min_neighbors >= 0, min_size >= 8, margin >= 0, temporal_radius >= 0, "
                             "max_gap >= 1 and cells >= 1 are required")


DEFAULT_SETTINGS = FaceBlurSettings()

_FRONTAL = "haarcascade_frontalface_default.xml"
_PROFILE = "haarcascade_profileface.xml"
_local = threading.local()   # CascadeClassifier is not documented as thread-safe: one set per thread


def _cascades():
    cached = getattr(_local, "cascades", None)
    if cached is None:
        import cv2

        cached = {}
        for key, name in (("frontal", _FRONTAL), ("profile", _PROFILE)):
            path = cv2.data.haarcascades + name
            clf = cv2.CascadeClassifier(path)
            if clf.empty():
                raise RuntimeError(f"cannot load the Haar cascade {path}; reinstall opencv-python-headless<5 "
                                   "(its wheel ships cv2/data/*.xml)")
            cached[key] = clf
        _local.cascades = cached
    return cached


def _merge(boxes: list[tuple[float, float, float, float]]) -> list[tuple[float, float, float, float]]:
    """Union boxes (x0, y0, x1, y1) that overlap a lot or hold each other's centre, until stable."""
    boxes = sorted(boxes)
    merged = True
    while merged and len(boxes) > 1:
        merged = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if _iou(a, b) > 0.3 or _holds_centre(a, b) or _holds_centre(b, a):
                    u = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
                    boxes = sorted([u] + [c for k, c in enumerate(boxes) if k not in (i, j)])
                    merged = True
                    break
            if merged:
                break
    return boxes


def _iou(a, b) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _holds_centre(a, b) -> bool:
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    return a[0] <= cx <= a[2] and a[1] <= cy <= a[3]


def _detect_frame(frame: np.ndarray, s: FaceBlurSettings) -> list[tuple[float, float, float, float]]:
    import cv2

    h, w = frame.shape[:2]
    grey = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
    short = min(h, w)
    scale = s.detect_side / short if short < s.detect_side else min(1.0, s.max_detect_side / short)
    if scale != 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA)
    gw = grey.shape[1]
    cascades = _cascades()
    kw = dict(scaleFactor=s.scale_factor, minNeighbors=s.min_neighbors, minSize=(s.min_size, s.min_size))
    found: list[tuple[float, float, float, float]] = []
    for x, y, bw, bh in cascades["frontal"].detectMultiScale(grey, **kw):
        found.append((x, y, x + bw, y + bh))
    if s.profile:
        for x, y, bw, bh in cascades["profile"].detectMultiScale(grey, **kw):
            found.append((x, y, x + bw, y + bh))
        for x, y, bw, bh in cascades["profile"].detectMultiScale(np.ascontiguousarray(grey[:, ::-1]), **kw):
            found.append((gw - x - bw, y, gw - x, y + bh))
    return [tuple(float(v) / scale for v in b) for b in _merge(found)]


def detect_faces(frames: np.ndarray, settings: FaceBlurSettings = DEFAULT_SETTINGS
                 ) -> list[list[tuple[float, float, float, float]]]:
    """Per frame, the face boxes (x0, y0, x1, y1) in the frame's pixels, sorted; no tracking."""
    frames = check_frames(frames, min_side=8)
    return [_detect_frame(f, settings) for f in frames]


def _tracks(per_frame, s: FaceBlurSettings) -> list[dict[int, tuple]]:
    """Greedy linking of detections into tracks {frame: box}, frame by frame, best overlap first."""
    tracks: list[dict[int, tuple]] = []
    for t, boxes in enumerate(per_frame):
        pairs = []
        for bi, box in enumerate(boxes):
            for ti, tr in enumerate(tracks):
                last_t = max(tr)
                if t - last_t > s.max_gap or last_t == t:
                    continue
                last = tr[last_t]
                size = max(last[2] - last[0], last[3] - last[1], box[2] - box[0], box[3] - box[1])
                dist = math.dist(((last[0] + last[2]) / 2, (last[1] + last[3]) / 2),
                                 ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
                if _iou(last, box) > 0.1 or dist <= 0.6 * size * (t - last_t):
                    pairs.append((-_iou(last, box), dist, bi, ti))
        used_b, used_t = set(), set()
        for _, _, bi, ti in sorted(pairs):
            if bi in used_b or ti in used_t:
                continue
            tracks[ti][t] = boxes[bi]
            used_b.add(bi)
            used_t.add(ti)
        for bi, box in enumerate(boxes):
            if bi not in used_b:
                tracks.append({t: box})
    return tracks


def _boxes_to_blur(per_frame, n_frames: int, s: FaceBlurSettings) -> list[list[tuple]]:
    """Per frame, the boxes to blur: detections, interpolations inside tracks, extensions past ends."""
    out: list[list[tuple]] = [list(b) for b in per_frame]
    for tr in _tracks(per_frame, s):
        ts = sorted(tr)
        for a, b in zip(ts, ts[1:]):
            for t in range(a + 1, b):
                f = (t - a) / (b - a)
                out[t].append(tuple(p + f * (q - p) for p, q in zip(tr[a], tr[b])))
        # speed per frame from the track's ends (zero for a single detection)
        first, last = ts[0], ts[-1]
        v = [(q - p) / (last - first) for p, q in zip(tr[first], tr[last])] if last > first else [0.0] * 4
        for k in range(1, s.temporal_radius + 1):
            for t, base, sign in ((first - k, tr[first], -1), (last + k, tr[last], 1)):
                if 0 <= t < n_frames:
                    moved = tuple(p + sign * k * dv for p, dv in zip(base, v))
                    out[t].append(base)
                    out[t].append(moved)
    return out


def _blur_box(frame: np.ndarray, box, s: FaceBlurSettings) -> None:
    import cv2

    h, w = frame.shape[:2]
    bw, bh = box[2] - box[0], box[3] - box[1]
    x0 = max(0, int(math.floor(box[0] - s.margin * bw)))
    y0 = max(0, int(math.floor(box[1] - s.margin * bh)))
    x1 = min(w, int(math.ceil(box[2] + s.margin * bw)))
    y1 = min(h, int(math.ceil(box[3] + s.margin * bh)))
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    region = frame[y0:y1, x0:x1]
    cw, ch = min(s.cells, x1 - x0), min(s.cells, y1 - y0)
    small = cv2.resize(region, (cw, ch), interpolation=cv2.INTER_AREA)
    frame[y0:y1, x0:x1] = cv2.resize(small, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)


def blur_boxes(frames: np.ndarray, detections: list[list[tuple[float, float, float, float]]],
               settings: FaceBlurSettings = DEFAULT_SETTINGS) -> np.ndarray:
    """A copy of `frames` with the faces in `detections` (per frame, as `detect_faces` gives them)
    blurred, after tracking, interpolation and extension (steps 2 and 3 of the module doc)."""
    frames = check_frames(frames, min_side=8)
    if len(detections) != len(frames):
        raise ValueError(f"detections must hold one list per frame: {len(detections)} lists for {len(frames)} frames")
    out = frames.copy()
    if not any(detections):
        return out
    for t, boxes in enumerate(_boxes_to_blur([list(map(tuple, b)) for b in detections], len(frames), settings)):
        frame = out[t]
        for box in sorted(boxes):
            _blur_box(frame, box, settings)
    return out


def blur_faces(frames: np.ndarray, settings: FaceBlurSettings = DEFAULT_SETTINGS) -> tuple[np.ndarray, int]:
    """uint8 (T, H, W, 3) frames → (a copy with every face blurred, the number of face detections).

    The count is the detector's hits summed over frames (before tracking adds interpolated and
    extended boxes); 0 means the copy equals the input. Same as
    `blur_boxes(frames, detect_faces(frames, settings), settings)`.
    """
    detections = detect_faces(frames, settings)
    return blur_boxes(frames, detections, settings), sum(len(b) for b in detections)
