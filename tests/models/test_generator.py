import dataclasses

import numpy as np
import pytest
import torch

from models.generator import grid_limits
from models.interface import RenderRequest, VideoGenerator, describe_model


def request(**kw):
    base = dict(caption="A red circle moves from the left to the right of the frame on a plain black background.",
                width=64, height=64, frames=16, fps=8, seed=3, steps=3, guidance=4.5)
    return RenderRequest(**{**base, **kw})


def test_protocol_info_and_limits(tiny_generator, tiny_config):
    g = tiny_generator
    assert isinstance(g, VideoGenerator)
    info, limits, recaptioner = describe_model("tiny")
    assert info == g.info and len(info.weights_sha256) == 64 and limits == g.limits
    assert limits.size_multiple == tiny_config.vae.spatial_compression * tiny_config.dit.patch_size[1]
    assert limits.frame_multiple == tiny_config.vae.temporal_compression
    assert (limits.default_width, limits.default_height, limits.default_fps, limits.default_seconds) == (64, 64, 8, 2.0)
    assert (limits.default_steps, limits.default_guidance) == (tiny_config.sampler.steps, tiny_config.sampler.guidance)


def test_default_limits():
    limits = grid_limits(__import__("models.config", fromlist=["load_config"]).load_config("default"))
    assert 16 % limits.frame_multiple == 0 and 64 % limits.size_multiple == 0 and 96 % limits.size_multiple == 0
    assert limits.max_size >= 256 and limits.max_frames >= 64 and 16 <= limits.default_steps <= 24


@pytest.mark.parametrize("width,height,frames", [(64, 64, 16), (96, 64, 8), (64, 96, 4)])
def test_frames_shape_and_timings(tiny_generator, width, height, frames):
    [out] = tiny_generator.generate([request(width=width, height=height, frames=frames)])
    assert out.frames.shape == (frames, height, width, 3) and out.frames.dtype == np.uint8
    assert set(out.timings) == {"text", "sample", "decode"} and all(v >= 0 for v in out.timings.values())


def test_same_request_same_frames_whatever_the_batch(tiny_generator):
    r = request()
    alone = tiny_generator.generate([r])[0].frames
    again = tiny_generator.generate([r])[0].frames
    other = request(caption="A blue square.", seed=9, width=96)
    batched = tiny_generator.generate([other, r])[1].frames
    assert np.array_equal(alone, again) and np.array_equal(alone, batched)
    assert alone.std() > 0


def test_seed_caption_and_guidance_change_the_clip(tiny_generator):
    base = tiny_generator.generate([request()])[0].frames
    for change in (dict(seed=4), dict(caption="A yellow triangle."), dict(guidance=1.0), dict(negative_caption="blur")):
        assert not np.array_equal(base, tiny_generator.generate([request(**change)])[0].frames), change


def test_off_grid_requests_are_rejected_with_the_nearest_value(tiny_generator):
    g = tiny_generator
    m = g.limits.size_multiple
    message = rf"^width=70 is not on the model's grid; nearest allowed is 72 \(multiples of {m} "
    with pytest.raises(ValueError, match=message):
        g.generate([request(width=70)])
    with pytest.raises(ValueError, match="height=1000 .* nearest allowed is 256"):
        g.generate([request(height=1000)])
    with pytest.raises(ValueError, match="frames=10 .* nearest allowed is 8"):
        g.generate([request(frames=10)])
    with pytest.raises(ValueError, match="steps=0 is outside"):
        g.generate([request(), request(steps=0)])  # the batch is checked before any work
    with pytest.raises(ValueError, match="fps=0"):
        g.generate([request(fps=0)])


def test_image_to_video_conditioning(tiny_generator):
    image = np.full((1, 64, 64, 3), 200, dtype=np.uint8)
    r = request(frames=8, cond_frames=image, cond_index=(0,))
    latents, mask = tiny_generator.encode_conditioning(r)
    assert mask.tolist() == [[1.0, 0.0]] and latents.shape[2] == 2
    out = tiny_generator.generate([r])[0].frames
    assert out.shape == (8, 64, 64, 3)
    unconditioned = tiny_generator.generate([dataclasses.replace(r, cond_frames=None, cond_index=())])[0].frames
    assert not np.array_equal(out, unconditioned)
    with pytest.raises(ValueError, match="cond_index"):
        tiny_generator.generate([dataclasses.replace(r, cond_index=(9,))])


def test_conditioning_latents_of_a_prefix_and_of_a_suffix(tiny_generator):
    """A given prefix encodes as the prefix alone (the VAE is causal); before a given suffix the
    encoder sees its first frame held, as the VAE's causal padding holds a clip's first frame."""
    from models.generator import pixels_to_video

    g = tiny_generator
    clip = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    latents, mask = g.encode_conditioning(request(frames=16, cond_frames=clip, cond_index=tuple(range(8))))
    alone = g.vae.encode(pixels_to_video(clip, g.device)).float()
    assert mask.tolist() == [[1.0, 1.0, 0.0, 0.0]] and torch.allclose(latents[:, :, :2], alone, atol=1e-5)
    latents, mask = g.encode_conditioning(request(frames=16, cond_frames=clip, cond_index=tuple(range(8, 16))))
    held = g.vae.encode(pixels_to_video(np.concatenate([np.repeat(clip[:1], 8, axis=0), clip]), g.device)).float()
    assert mask.tolist() == [[0.0, 0.0, 1.0, 1.0]] and torch.allclose(latents, held)
    gray = g.vae.encode(pixels_to_video(np.concatenate([np.full_like(clip, 128), clip]), g.device)).float()
    assert not torch.allclose(latents[:, :, 2:], gray[:, :, 2:])  # the given latents depend on the fill


def test_default_model_renders_the_default_clip():
    """The shipped default (a real DiT) at its default size; few steps to stay quick."""
    from models.interface import load_generator

    g = load_generator("default", device="cpu")
    limits = g.limits
    frames = round(limits.default_seconds * limits.default_fps)
    [out] = g.generate([request(width=limits.default_width, height=limits.default_height, frames=frames,
                                steps=2, guidance=limits.default_guidance)])
    assert out.frames.shape == (16, 64, 64, 3)
    assert sum(p.numel() for p in g.dit.parameters()) > 1_000_000  # sized for CPUs: docs/MODEL_CARD.md


def test_requests_of_one_shape_are_sampled_together_with_their_own_frames(tiny_generator):
    """generate_together: same-shape text→video requests share one batch (and report its size), other
    shapes and requests with given frames are sampled apart, and every clip is generate's own clip
    to rounding (the batch's matrix products round differently: at most one level)."""
    g = tiny_generator
    given = np.full((1, 64, 64, 3), 200, np.uint8)
    requests = [request(seed=1), request(seed=2, caption="A blue square.", negative_caption="blur"),
                request(seed=3, width=96), request(seed=4, cond_frames=given, cond_index=(0,)), request(seed=5)]
    together = g.generate_together(requests)
    assert [out.timings["batch"] for out in together] == [3, 3, 1, 1, 3]
    for r, out in zip(requests, together):
        [alone] = g.generate([r])
        assert out.frames.shape == alone.frames.shape
        assert np.abs(out.frames.astype(int) - alone.frames.astype(int)).max() <= 1
    assert not np.array_equal(together[0].frames, together[4].frames)  # each its own noise
    with pytest.raises(ValueError):  # all or nothing, as generate
        g.generate_together([request(), request(width=70)])
