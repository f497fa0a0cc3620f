"""GridLimits' frame grid: multiples of a step (the default model) or offset + multiples (Wan's 4k+1)."""

import dataclasses
import re

import pytest

from models.render_types import GridLimits, RenderRequest

DEFAULT_LIKE = GridLimits(
    size_multiple=16, min_size=32, max_size=256, max_pixels=256 * 256, frame_multiple=4, max_frames=240,
    window_frames=16, context_frames=8, min_fps=1, max_fps=30, max_steps=100, default_width=64, default_height=64,
    default_fps=8, default_seconds=2.0, default_steps=20, default_guidance=4.5)
WAN_LIKE = dataclasses.replace(DEFAULT_LIKE, frame_offset=1, max_frames=81, window_frames=81, context_frames=0)


def check_frames(limits, frames):
    limits.check(RenderRequest("p", 64, 64, frames, 8, 0, 20, 4.5))


def test_multiples_of_the_step_for_the_default_model():
    assert DEFAULT_LIKE.min_frames == 4
    assert [DEFAULT_LIKE.frames_for(s, 8) for s in (0.01, 1.0, 1.2, 1.3, 2.0, 100.0)] == [4, 8, 8, 12, 16, 800]
    assert [DEFAULT_LIKE.nearest_frames(n) for n in (0, 5, 6, 7, 10, 999)] == [4, 4, 8, 8, 8, 240]
    check_frames(DEFAULT_LIKE, 16)
    with pytest.raises(ValueError) as e:
        check_frames(DEFAULT_LIKE, 17)
    assert str(e.value) == "frames=17 is not on the model's grid; nearest allowed is 16 (multiples of 4 up to 240)"


def test_four_k_plus_one_for_wan():
    assert WAN_LIKE.min_frames == 1
    assert [WAN_LIKE.frames_for(s, 16) for s in (0.01, 0.25, 1.0, 5.0625, 10.0)] == [1, 5, 17, 81, 161]
    assert [WAN_LIKE.nearest_frames(n) for n in (0, 1, 2, 4, 8, 80, 100)] == [1, 1, 1, 5, 9, 81, 81]
    for ok in (1, 5, 81):
        check_frames(WAN_LIKE, ok)
    for bad, nearest in ((8, 9), (0, 1), (85, 81)):
        with pytest.raises(ValueError) as e:
            check_frames(WAN_LIKE, bad)
        assert str(e.value) == (f"frames={bad} is not on the model's grid; nearest allowed is {nearest} "
                                f"(1 + a multiple of 4, from 1 to 81)")


def test_the_shortest_allowed_count_holding_n_frames():
    assert [DEFAULT_LIKE.frames_at_least(n) for n in (1, 4, 5, 8, 9, 300)] == [4, 4, 8, 8, 12, 300]
    assert [WAN_LIKE.frames_at_least(n) for n in (0, 1, 2, 5, 6, 81, 82)] == [1, 1, 5, 5, 9, 81, 85]


def test_guidance_2_only_where_the_model_takes_it():
    request = RenderRequest("p", 64, 64, 16, 8, 0, 20, 4.5, guidance_2=3.0)
    with pytest.raises(ValueError, match="^guidance_2 is for a model with a low-noise expert"):
        DEFAULT_LIKE.check(request)
    two = dataclasses.replace(DEFAULT_LIKE, has_guidance_2=True)
    two.check(request)
    with pytest.raises(ValueError, match=r"^guidance_2=-1 is outside 0..30$"):
        two.check(dataclasses.replace(request, guidance_2=-1.0))


def test_guidance_is_bounded_by_what_a_sampler_can_use():
    request = RenderRequest("p", 64, 64, 16, 8, 0, 20, 30.0)
    DEFAULT_LIKE.check(request)
    for guidance, shown in ((1e308, "1e+308"), (float("nan"), "nan"), (30.5, "30.5"), (-0.5, "-0.5")):
        with pytest.raises(ValueError, match=rf"^guidance={re.escape(shown)} is outside 0..30$"):
            DEFAULT_LIKE.check(dataclasses.replace(request, guidance=guidance))
    assert DEFAULT_LIKE.frames_for(1e308, 8) > DEFAULT_LIKE.max_frames  # an int, not an OverflowError
