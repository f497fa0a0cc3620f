"""The pixel judge recovers every attribute of procedurally rendered clips, clean and perturbed."""

import io

import numpy as np
import pytest

from models.shapes.judge import adherence, aggregate, judge_clip, judge_clips, min_visible_pixels
from models.shapes.world import ATTRIBUTES, BACKGROUNDS, COLOURS, SHAPES, Scene, coverage, render_scene, sample_scenes

SIZES = [(64, 64), (96, 64), (64, 96)]


def _blur3(clip: np.ndarray) -> np.ndarray:
    x = clip.astype(np.float32)
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = x.shape[1:3]
    return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9


def _perturb(clip: np.ndarray, rng) -> np.ndarray:
    """An encoder's and a model's imperfections: a 3x3 blur and Gaussian noise of sigma 8."""
    return np.clip(np.rint(_blur3(clip) + rng.normal(0, 8, clip.shape)), 0, 255).astype(np.uint8)


def _clips(n: int, seed: int):
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, n, include_held_out=True)
    clips = [render_scene(s, width=SIZES[i % 3][0], height=SIZES[i % 3][1], frames=(8, 16, 24)[i % 3], rng=rng)
             for i, s in enumerate(scenes)]
    return scenes, clips, rng


def _accuracy(clips, scenes):
    results = [judge_clip(c) for c in clips]
    report = aggregate(results, scenes)
    wrong = [(s, r) for s, r in zip(scenes, results) if not all(adherence(r, s).values())]
    return report, wrong


@pytest.fixture(scope="module")
def rendered():
    return _clips(300, seed=11)


def test_judge_recovers_every_attribute(rendered):
    scenes, clips, _ = rendered
    report, wrong = _accuracy(clips, scenes)
    print("\njudge, clean:", report["attributes"], "permanence", report["permanence"])
    for attr in ATTRIBUTES:
        assert report["attributes"][attr] >= 0.99, (attr, wrong[:5])
    assert report["permanence"] == 1.0
    assert report["held_out"]["clips"] > 0 and report["held_in"]["clips"] > 0


def test_judge_survives_blur_and_noise(rendered):
    scenes, clips, rng = rendered
    report, wrong = _accuracy([_perturb(c, rng) for c in clips], scenes)
    print("\njudge, blur + noise:", report["attributes"], "permanence", report["permanence"])
    for attr in ATTRIBUTES:
        assert report["attributes"][attr] >= 0.99, (attr, wrong[:5])
    assert report["permanence"] >= 0.99


def test_judge_survives_h264_and_jpeg():
    """The real encoder (libx264, yuv420p: chroma at half resolution) and JPEG quality 60."""
    av = pytest.importorskip("av")
    from PIL import Image

    from pipeline.media.encode import encode_mp4

    scenes, clips, _ = _clips(36, seed=12)
    decoded = []
    for clip in clips[:18]:
        with av.open(io.BytesIO(encode_mp4(clip, 8, crf=28))) as container:
            decoded.append(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))
    for clip in clips[18:]:
        frames = []
        for f in clip:
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, "JPEG", quality=60)
            frames.append(np.asarray(Image.open(buf).convert("RGB")))
        decoded.append(np.stack(frames))
    report, wrong = _accuracy(decoded, scenes)
    print("\njudge, H.264 crf 28 / JPEG q60:", report["attributes"])
    assert report["all_attributes"] >= 34 / 36, wrong


def test_empty_clip_is_not_visible():
    for bg in BACKGROUNDS.values():
        clip = np.broadcast_to(np.array(bg, np.uint8), (16, 64, 96, 3)).copy()
        for frames in (clip, _perturb(clip, np.random.default_rng(0))):
            r = judge_clip(frames)
            assert not r.visible and r.visible_frames == 0.0
            assert (r.shape, r.colour, r.motion) == (None, None, None)
            assert r.background == min(BACKGROUNDS, key=lambda n: sum((a - b) ** 2 for a, b in zip(BACKGROUNDS[n], bg)))
    r = judge_clip(np.zeros((8, 64, 64, 3), np.uint8))
    s = Scene("circle", "red", "black", "still")
    assert adherence(r, s) == {"shape": False, "colour": False, "background": True, "motion": False}


def test_permanence_counts_frames():
    scene = Scene("square", "red", "gray", "still")
    clip = render_scene(scene, frames=16, rng=4)
    clip[8:] = BACKGROUNDS["gray"]                      # the object vanishes half-way
    r = judge_clip(clip)
    assert r.visible_frames == 0.5 and r.shape == "square" and r.colour == "red"
    # A speck below the visibility floor does not count.
    clip = np.full((8, 64, 64, 3), BACKGROUNDS["navy"], np.uint8)
    clip[:, 30:32, 30:32] = COLOURS["white"]
    assert 4 < min_visible_pixels(64, 64)
    assert judge_clip(clip).visible_frames == 0.0


def _clip_of(shape, path, *, width=64, height=64, frames=16, colour="white", bg="black", aspect=1.0):
    """A clip whose object follows `path(t) -> (cx, cy, h)` (fractions of the frame / pixels)."""
    t = np.linspace(0, 1, frames)
    cx, cy, h = (np.array(v, dtype=np.float64) for v in zip(*[path(x) for x in t]))
    alpha = coverage(shape, width, height, cx * width, cy * height, h * aspect, h)[..., None]
    fg, b = np.array(COLOURS[colour], np.float32), np.array(BACKGROUNDS[bg], np.float32)
    return np.rint(b + alpha * (fg - b)).astype(np.uint8)


def test_motion_thresholds_tolerate_imperfect_output():
    # Half the contract's motion still reads as that motion; a quarter of it is unclear.
    assert judge_clip(_clip_of("circle", lambda t: (0.4 + 0.2 * t, 0.5, 8))).motion == "right"
    assert judge_clip(_clip_of("circle", lambda t: (0.5, 0.6 - 0.2 * t, 8))).motion == "up"
    assert judge_clip(_clip_of("circle", lambda t: (0.5 - 0.1 * t, 0.5, 8))).motion is None
    assert judge_clip(_clip_of("circle", lambda t: (0.5 + 0.02 * t, 0.5, 8))).motion == "still"
    assert judge_clip(_clip_of("circle", lambda t: (0.5, 0.5, 6 + 2 * t))).motion == "grows"       # 1.8x area
    assert judge_clip(_clip_of("circle", lambda t: (0.5, 0.5, 8 - 2 * t))).motion == "shrinks"
    assert judge_clip(_clip_of("circle", lambda t: (0.5, 0.5, 8 - 0.5 * t))).motion == "still"
    # A large move with a little scale change is a move; a large scale change with a drift is a scale.
    assert judge_clip(_clip_of("square", lambda t: (0.2 + 0.5 * t, 0.5, 6 + 1.5 * t))).motion == "right"
    assert judge_clip(_clip_of("square", lambda t: (0.45 + 0.1 * t, 0.5, 5 + 7 * t))).motion == "grows"
    # The opposite motion never adheres.
    r = judge_clip(_clip_of("circle", lambda t: (0.7 - 0.4 * t, 0.5, 8)))
    assert not adherence(r, Scene("circle", "white", "black", "right"))["motion"]


def test_shape_features_are_robust():
    rng = np.random.default_rng(3)
    for shape in SHAPES:
        for h, aspect in ((4.5, 1.0), (7, 1.0), (12, 1.0), (9, 1.3), (9, 0.8)):   # small, large, stretched
            clip = _clip_of(shape, lambda t, h=h: (0.5, 0.5, h), frames=8, aspect=aspect)
            for frames in (clip, _perturb(clip, rng)):
                r = judge_clip(frames)
                assert r.shape == shape, (shape, h, aspect, r.details["shape_iou"])
    # Orientation matters: a square turned 45 degrees is a diamond, a triangle upside down is not
    # an upright triangle's twin (its fitted template scores well below).
    up = judge_clip(_clip_of("triangle", lambda t: (0.5, 0.5, 10), frames=8)).details["shape_iou"]
    down = judge_clip(_clip_of("triangle", lambda t: (0.5, 0.5, 10), frames=8)[:, ::-1]).details["shape_iou"]
    assert down["triangle"] < up["triangle"] - 0.2


def test_colour_and_background_on_every_pair():
    rng = np.random.default_rng(5)
    for colour in COLOURS:
        for bg in BACKGROUNDS:
            clip = _perturb(_clip_of("diamond", lambda t: (0.5, 0.5, 6), colour=colour, bg=bg, frames=8), rng)
            r = judge_clip(clip)
            assert (r.colour, r.background) == (colour, bg)


def test_aggregate_splits_held_out():
    a, b = Scene("circle", "red", "black", "left"), Scene("circle", "yellow", "navy", "up")   # b is held out
    clips = [render_scene(a, rng=0), np.zeros((16, 64, 64, 3), np.uint8)]
    report = judge_clips(clips, [a, b])
    assert report["clips"] == 2
    assert report["held_in"]["adherence"] == 1.0 and report["held_in"]["permanence"] == 1.0
    assert report["held_out"]["adherence"] == 0.0 and report["held_out"]["permanence"] == 0.0
    assert report["adherence"] == 0.5 and report["permanence"] == 0.5
    assert report["attributes"]["background"] == 0.5
    with pytest.raises(ValueError):
        aggregate([judge_clip(clips[0])], [a, b])
