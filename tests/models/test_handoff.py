"""A render's stages apart (`models/handoff.py`): a generator loaded with its text encoder alone encodes the
captions, one without a text encoder samples latents from those states, one with the VAE alone decodes them;
the states and latents cross as bytes, as they cross the object store. The frames are the whole generator's,
exactly, on the default model and on tiny Wan folders of each text kind (and an image one)."""

import dataclasses

import numpy as np
import pytest

from models.interface import RenderRequest, from_bytes, load_generator, to_bytes

REQUEST = RenderRequest(caption="A red circle moves right.", negative_caption="blurry", width=32, height=32,
                        frames=8, fps=8, seed=5, steps=4, guidance=4.5)


def apart(model, requests, device="cpu") -> list[np.ndarray]:
    """Each request's frames from three generators of `model`, one per stage, through bytes."""
    text = load_generator(model, device=device, parts=("text",))
    dit = load_generator(model, device=device, parts=("dit", "vae"))
    vae = load_generator(model, device=device, parts=("vae",))
    frames = []
    for r in requests:
        assert dit.hands_over(r)
        states = from_bytes(to_bytes(text.encode_captions([r.caption, r.negative_caption])))
        [out] = dit.generate_latents([r], text_states=states)
        assert out.frames is None and out.latents is not None
        frames.append(vae.decode_latents(from_bytes(to_bytes(out.latents))))
    return frames


def test_the_default_models_stages_apart_give_its_frames(tiny_generator):
    remix = dataclasses.replace(REQUEST, init_frames=np.full((8, 32, 32, 3), 90, np.uint8), strength=0.6)
    cached = dataclasses.replace(REQUEST, step_cache=0.3, steps=8)
    requests = [REQUEST, remix, cached]
    for r, got in zip(requests, apart("tiny", requests)):
        [want] = tiny_generator.generate([r])
        assert np.array_equal(got, want.frames)


def test_the_default_model_decodes_given_frames_and_long_clips_where_it_samples(tiny_generator):
    """Given frames come back as given, and a long clip's windows condition on frames decoded before them:
    those requests are not handed over, and sampled whole from states handed over they equal the whole render."""
    given = dataclasses.replace(REQUEST, cond_frames=np.zeros((1, 32, 32, 3), np.uint8), cond_index=(0,))
    limits = tiny_generator.limits
    long = dataclasses.replace(REQUEST, frames=limits.window_frames + limits.frame_multiple)
    text = load_generator("tiny", device="cpu", parts=("text",))
    dit = load_generator("tiny", device="cpu", parts=("dit", "vae"))
    for r in (given, long):
        assert not dit.hands_over(r)
        with pytest.raises(ValueError, match="decodes where it samples"):
            dit.generate_latents([r], text_states={})
        states = text.encode_captions([r.caption, r.negative_caption])
        assert np.array_equal(dit.generate([r], text_states=states)[0].frames, tiny_generator.generate([r])[0].frames)


def test_a_stage_without_a_part_says_what_it_lacks():
    dit = load_generator("tiny", device="cpu", parts=("dit", "vae"))
    with pytest.raises(ValueError, match=r"parts \['dit', 'vae'\]: it cannot encode a caption without text states "
                                         r"handed over \(that needs 'text'\)"):
        dit.generate([REQUEST])
    only_caption = load_generator("tiny", device="cpu", parts=("text",)).encode_captions([REQUEST.caption])
    with pytest.raises(ValueError, match="no text states were handed over for the caption 'blurry'"):
        dit.generate([REQUEST], text_states=only_caption)
    vae = load_generator("tiny", device="cpu", parts=("vae",))
    with pytest.raises(ValueError, match="cannot sample a clip"):
        vae.generate([REQUEST])
    with pytest.raises(ValueError, match="sampling needs the VAE too"):
        load_generator("tiny", device="cpu", parts=("dit",))
    with pytest.raises(ValueError, match="each must be one of text, dit, vae"):
        load_generator("tiny", device="cpu", parts=("unet",))


WAN = RenderRequest(caption="a cat bakes a cake", negative_caption="blurry static", width=32, height=32, frames=5,
                    fps=16, seed=3, steps=2, guidance=5.0)


@pytest.mark.parametrize("variant", ["wan21", "ti2v", "a14b"])
def test_a_wan_folders_stages_apart_give_its_frames(variant, wan_folders):
    folder = wan_folders[variant]
    whole = load_generator(folder, device="cpu")
    requests = [WAN]
    if variant == "wan21":  # a long clip (stitched windows, decoded once) and a remix
        requests += [dataclasses.replace(WAN, frames=whole.limits.window_frames + 4),
                     dataclasses.replace(WAN, init_frames=np.full((5, 32, 32, 3), 90, np.uint8), strength=0.5)]
    for r, got in zip(requests, apart(folder, requests)):
        assert np.array_equal(got, whole.generate([r])[0].frames)


def test_a_wan_image_folders_stages_apart_give_its_frames(wan_image_pipelines):
    folder, _ = wan_image_pipelines["i2v"]
    r = dataclasses.replace(WAN, cond_frames=np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), np.uint8),
                            cond_index=(0,))
    [got] = apart(folder, [r])
    assert np.array_equal(got, load_generator(folder, device="cpu").generate([r])[0].frames)
