"""The shapes world's vocabulary, captions and renderer against docs/SHAPES_WORLD.md."""

import numpy as np
import pytest

from models.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT,
    MOTIONS,
    SHAPES,
    Scene,
    all_scenes,
    canonical_caption,
    render_scene,
    sample_scenes,
    scene_from_caption,
)

SIZES = [(64, 64), (96, 64), (64, 96)]
FRAMES = [8, 16, 24]


def test_vocabulary_is_the_contract():
    assert SHAPES == ("circle", "square", "triangle", "diamond")
    assert COLOURS == {"red": (220, 40, 40), "orange": (240, 140, 30), "yellow": (240, 220, 40),
                       "green": (40, 180, 60), "blue": (40, 90, 230), "purple": (150, 60, 200),
                       "white": (240, 240, 240)}
    assert BACKGROUNDS == {"black": (10, 10, 10), "gray": (120, 120, 120), "navy": (20, 25, 70),
                           "brown": (90, 60, 30)}
    assert len(MOTIONS) == 7
    assert HELD_OUT == {("green", "triangle"), ("orange", "diamond"), ("purple", "square"), ("yellow", "circle")}
    assert len(list(all_scenes())) == 784
    assert len(list(all_scenes(include_held_out=False))) == 784 - 4 * 4 * 7
    with pytest.raises(ValueError):
        Scene("star", "red", "black", "left")


def test_canonical_captions():
    assert canonical_caption(Scene("circle", "green", "navy", "right")) == (
        "A green circle moves right, sliding rightward across the frame, on a plain navy background. "
        "The camera is static.")
    assert canonical_caption(Scene("diamond", "orange", "gray", "still")).startswith("An orange diamond stays still")
    captions = {canonical_caption(s): s for s in all_scenes()}
    assert len(captions) == 784                                   # one caption per scene
    for caption, scene in captions.items():
        assert scene_from_caption(caption) == scene               # exact inverse
    for bad in ("a green circle moves right", "A green circle moves right, sliding rightward across the frame, "
                "on a plain navy background.", ""):
        with pytest.raises(ValueError):
            scene_from_caption(bad)


def test_sample_scenes():
    a = sample_scenes(np.random.default_rng(5), 400)
    assert a == sample_scenes(5, 400)
    assert not any(s.held_out for s in a)
    assert {s.motion for s in a} == set(MOTIONS) and {s.background for s in a} == set(BACKGROUNDS)
    b = sample_scenes(5, 400, include_held_out=True)
    assert any(s.held_out for s in b)


def _alpha(clip: np.ndarray, scene: Scene) -> np.ndarray:
    """Per-pixel object coverage recovered from a clean render."""
    bg = np.array(BACKGROUNDS[scene.background], np.float64)
    fg = np.array(COLOURS[scene.colour], np.float64)
    return ((clip - bg) @ (fg - bg)) / ((fg - bg) @ (fg - bg))


def test_renderer_obeys_the_contract():
    rng = np.random.default_rng(0)
    scenes = sample_scenes(rng, 210, include_held_out=True)
    # Every motion in every size and length, a few times.
    scenes += [Scene(s.shape, s.colour, s.background, m) for s in scenes[:6] for m in MOTIONS]
    for i, scene in enumerate(scenes):
        width, height = SIZES[i % 3]
        frames = FRAMES[(i // 3) % 3]
        clip = render_scene(scene, width=width, height=height, frames=frames, rng=rng)
        assert clip.dtype == np.uint8 and clip.shape == (frames, height, width, 3)
        bg = np.array(BACKGROUNDS[scene.background], np.uint8)
        # Fully inside the frame (at frame 0 and after): the border is pure background.
        for edge in (clip[:, 0], clip[:, -1], clip[:, :, 0], clip[:, :, -1]):
            assert (edge == bg).all(), (scene, width, height)
        alpha = _alpha(clip, scene)
        assert alpha.min() > -0.02 and alpha.max() < 1.02               # only bg, fg and their blends
        area = alpha.sum(axis=(1, 2))
        assert (area > 20).all()                                        # visible every frame
        ys, xs = np.mgrid[0:height, 0:width] + 0.5
        cx = (alpha * xs).sum(axis=(1, 2)) / area
        cy = (alpha * ys).sum(axis=(1, 2)) / area
        dx, dy = (cx[-1] - cx[0]) / width, (cy[-1] - cy[0]) / height
        ratio = area[-1] / area[0]
        m = scene.motion
        if m in ("left", "right"):
            assert (dx >= 0.40 if m == "right" else dx <= -0.40) and abs(dy) < 0.03, (scene, dx, dy)
            assert abs(ratio - 1) < 0.05
        elif m in ("up", "down"):
            assert (dy >= 0.40 if m == "down" else dy <= -0.40) and abs(dx) < 0.03, (scene, dx, dy)
            assert abs(ratio - 1) < 0.05
        elif m == "grows":
            assert ratio >= 2.5 and np.all(np.diff(area) >= 0), (scene, ratio)
        elif m == "shrinks":
            assert ratio <= 1 / 2.5 and np.all(np.diff(area) <= 0), (scene, ratio)
        else:
            assert abs(dx) < 0.03 and abs(dy) < 0.03 and abs(ratio - 1) < 0.01
        if m in ("grows", "shrinks"):   # the centre stays put
            assert abs(dx) < 0.03 and (abs(dy) < 0.03 or scene.shape == "triangle")


def test_renderer_is_random_but_reproducible():
    scene = Scene("triangle", "blue", "brown", "right")
    a = render_scene(scene, rng=3)
    assert np.array_equal(a, render_scene(scene, rng=np.random.default_rng(3)))
    clips = [render_scene(scene, rng=np.random.default_rng(s)) for s in range(6)]
    assert len({c.tobytes() for c in clips}) == 6                       # start, size and speed vary
    sizes = {int((_alpha(c, scene)[0] > 0.5).sum()) for c in clips}
    assert len(sizes) > 1


def test_renderer_anti_aliases_and_draws_each_shape():
    rng = np.random.default_rng(1)
    for shape, fill in (("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5), ("diamond", 0.5)):
        scene = Scene(shape, "white", "black", "still")
        clip = render_scene(scene, width=96, height=96, frames=8, rng=rng)
        alpha = _alpha(clip, scene)[0]
        if shape != "square":  # a square's edges may fall on pixel boundaries; slanted and curved ones cannot
            assert ((alpha > 0.05) & (alpha < 0.95)).any()              # soft edges
        rows, cols = np.nonzero(alpha > 0.5)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert abs(alpha.sum() / box - fill) < 0.12, shape
    # The triangle's apex is up: three quarters of its mass lie in the lower half of its box.
    scene = Scene("triangle", "white", "black", "still")
    alpha = _alpha(render_scene(scene, frames=8, rng=2), scene)[0]
    rows = np.nonzero(alpha.sum(axis=1) > 0.5)[0]
    mid = (rows[0] + rows[-1] + 1) / 2
    lower = alpha[int(np.ceil(mid)):].sum()
    assert lower > 0.65 * alpha.sum()


def test_renderer_rejects_bad_sizes():
    with pytest.raises(ValueError):
        render_scene(Scene("circle", "red", "black", "left"), width=16, height=64, rng=0)
    with pytest.raises(ValueError):
        render_scene(Scene("circle", "red", "black", "left"), frames=1, rng=0)
