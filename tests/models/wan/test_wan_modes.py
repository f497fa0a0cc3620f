"""Modes on a Wan text-to-video checkpoint: a remix is diffusers' `WanVideoToVideoPipeline` (SDEdit at
`strength`), to the bit; at strength 1 it is (all but) text→video for every variant; below one step it is
the video itself. (Stills: `test_wan_generator.py`'s one-frame requests equal `WanPipeline(num_frames=1)`.)"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from models.interface import RenderRequest

REQUEST = RenderRequest(caption="a blue square moves left", width=32, height=32, frames=9, fps=16, seed=11, steps=4,
                        guidance=5.0, negative_caption="blurry static")


def moving_square(frames: int = 9, size: int = 32) -> np.ndarray:
    """uint8 frames of a white square on a dark red ground, moving right: the video a remix starts from."""
    video = np.zeros((frames, size, size, 3), np.uint8)
    video[..., 0] = 90
    for i in range(frames):
        video[i, 10:20, 2 + 2 * i:12 + 2 * i] = 230
    return video


@pytest.mark.parametrize("strength", [0.5, 0.8])
def test_a_remix_is_diffusers_video_to_video(strength, generators, wan_pipelines):
    from diffusers import WanVideoToVideoPipeline

    pipe = wan_pipelines["wan21"][1]
    v2v = WanVideoToVideoPipeline(**{k: pipe.components[k] for k in
                                     ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")})
    video = moving_square()
    r = dataclasses.replace(REQUEST, init_frames=video, strength=strength)
    [out] = generators["wan21"].generate([r])
    # the prompts encoded by WanPipeline's encode_prompt: the video-to-video module's own prompt cleaning
    # needs the optional `ftfy` package (WanPipeline's uses it only where installed; it is not here)
    with torch.no_grad():  # as in __call__ (with gradients on, attention takes another kernel: 6e-7 off)
        cond, uncond = pipe.encode_prompt(prompt=r.caption, negative_prompt=r.negative_caption, device="cpu",
                                          max_sequence_length=512)  # as WanPipeline.__call__ asks (default 226)
    expected = v2v(video=[Image.fromarray(f) for f in video], prompt_embeds=cond, negative_prompt_embeds=uncond,
                   height=r.height, width=r.width, num_inference_steps=r.steps, guidance_scale=r.guidance,
                   strength=strength, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np").frames[0]
    assert np.array_equal(out.frames, (expected * 255).round().astype(np.uint8))  # max abs difference 0
    [plain] = generators["wan21"].generate([REQUEST])
    assert not np.array_equal(out.frames, plain.frames)  # the video shaped it (random weights: no closer look)


@pytest.mark.parametrize("variant", ["wan21", "ti2v", "a14b"])
def test_a_remix_at_strength_1_is_text_to_video_and_below_one_step_the_video(variant, generators):
    gen, video = generators[variant], moving_square(5)
    r = dataclasses.replace(REQUEST, frames=5, steps=2)
    [full] = gen.generate([dataclasses.replace(r, init_frames=video, strength=1.0)])
    [t2v] = gen.generate([r])
    # the first timestep's sigma is 1 - 3e-4 (flow sigmas, shifted): the video all but gone, the same noise
    diff = np.abs(full.frames.astype(int) - t2v.frames)
    print(f"{variant}: remix at strength 1 vs text→video: mean {diff.mean():.3f}, max {diff.max()} levels")
    assert diff.mean() < 0.05 and diff.max() <= 2
    [kept] = gen.generate([dataclasses.replace(r, init_frames=video, strength=0.49)])  # int(2 x 0.49) = 0 steps
    assert np.array_equal(kept.frames, video)
