"""Pictures as conditions on Wan: reelforge's generator renders what diffusers' `WanImageToVideoPipeline`
renders, to the bit, on tiny random folders of each kind (tests/conftest.py): Wan 2.1 I2V (CLIP image
states), Wan 2.1 FLF2V (first and last frame, two pictures' CLIP states), Wan 2.2 I2V-A14B (two experts, no
image encoder; first frame, and first and last), Wan 2.2 TI2V-5B (the picture's latent frame fixed at t = 0).
The same seed, size, frames, steps and guidance; the pipeline's prompt states come from `WanPipeline`'s own
text encoding under no_grad (the i2v module's prompt cleaning needs the optional `ftfy`, not installed).
On TI2V-5B the first frame is the picture's VAE reconstruction, exactly: the seam of an extension."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from models.interface import RenderRequest, describe_model, load_generator
from models.wan.folder import WanFolderError, read_wan_folder

REQUEST = RenderRequest(caption="a red circle moves right", width=32, height=32, frames=5, fps=16, seed=3, steps=2,
                        guidance=5.0, negative_caption="blurry static")
PICTURES = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def image_folders(wan_image_pipelines, wan_pipelines):
    """{kind: (folder, WanImageToVideoPipeline)} of the three image folders and TI2V-5B (a WanPipeline folder
    whose image path diffusers runs as WanImageToVideoPipeline with expand_timesteps)."""
    from diffusers import WanImageToVideoPipeline

    folder, t2v = wan_pipelines["ti2v"]
    parts = {k: v for k, v in t2v.components.items() if k != "transformer_2"}
    return {**wan_image_pipelines, "ti2v": (folder, WanImageToVideoPipeline(**parts, expand_timesteps=True))}


@pytest.fixture(scope="module")
def image_generators(image_folders):
    return {kind: load_generator(folder, device="cpu") for kind, (folder, _) in image_folders.items()}


def pipeline_frames(pipe, r: RenderRequest) -> np.ndarray:
    from diffusers import WanPipeline

    with torch.no_grad():  # as in __call__
        cond, uncond = (WanPipeline._get_t5_prompt_embeds(pipe, text, max_sequence_length=512, device="cpu")
                        for text in (r.caption, r.negative_caption))
    last = {"last_image": Image.fromarray(r.cond_frames[1])} if len(r.cond_index) == 2 else {}
    out = pipe(image=Image.fromarray(r.cond_frames[0]), prompt_embeds=cond, negative_prompt_embeds=uncond,
               height=r.height, width=r.width, num_frames=r.frames, num_inference_steps=r.steps,
               guidance_scale=r.guidance, generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np",
               **last).frames[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("kind,ends", [("i2v", False), ("flf2v", True), ("i2v-a14b", False), ("i2v-a14b", True),
                                       ("ti2v", False)])
def test_frames_equal_diffusers_image_to_video(kind, ends, image_generators, image_folders):
    index = (0, REQUEST.frames - 1) if ends else (0,)
    r = dataclasses.replace(REQUEST, cond_frames=PICTURES[:len(index)], cond_index=index)
    [out] = image_generators[kind].generate([r])
    expected = pipeline_frames(image_folders[kind][1], r)
    assert out.frames.shape == (5, 32, 32, 3) and np.array_equal(out.frames, expected)  # max abs difference 0
    assert out.frames.std() > 1  # not a flat picture


def test_ti2v_first_frame_is_the_pictures_reconstruction(image_generators):
    gen = image_generators["ti2v"]
    r = dataclasses.replace(REQUEST, cond_frames=PICTURES[:1], cond_index=(0,))
    [out] = gen.generate([r])
    with torch.inference_mode():  # the picture alone through the VAE: encoded (mode), decoded
        video = gen.video_processor.preprocess(Image.fromarray(PICTURES[0]), height=32, width=32).unsqueeze(2)
        latents = gen.vae.encode(video).latent_dist.mode()
        mean, inv_std = gen._latent_stats(torch.float32)
        reconstruction = gen.decode((latents - mean) * inv_std)
    assert np.array_equal(out.frames[0], reconstruction[0])
    assert np.abs(out.frames[0].astype(int) - PICTURES[0]).mean() > 10  # a tiny random VAE: far from the picture


def test_each_kind_takes_only_the_frames_it_can(image_generators):
    gens = image_generators
    first = dataclasses.replace(REQUEST, cond_frames=PICTURES[:1], cond_index=(0,))
    both = dataclasses.replace(REQUEST, cond_frames=PICTURES, cond_index=(0, 4))
    middle = dataclasses.replace(REQUEST, cond_frames=PICTURES[:1], cond_index=(2,))
    with pytest.raises(ValueError, match=r"^Tiny-i2v-Diffusers is an image-to-video checkpoint: it needs a first "
                                         r"frame \(image→video\)$"):
        gens["i2v"].generate([REQUEST])
    with pytest.raises(ValueError, match=r"^Tiny-flf2v-Diffusers takes a first and a last frame \(interpolation\), "
                                         r"not given frames at \(0,\)$"):
        gens["flf2v"].generate([first])
    with pytest.raises(ValueError, match=r"takes a first frame \(image→video\), not given frames at \(0, 4\)$"):
        gens["ti2v"].generate([both])
    with pytest.raises(ValueError, match=r"or a first and a last frame \(interpolation\), not given frames at \(2,\)"):
        gens["i2v-a14b"].generate([middle])


def test_folders_say_what_they_render(image_folders):
    modes = {kind: describe_model(folder)[1].modes for kind, (folder, _) in image_folders.items()}
    assert modes == {"i2v": ("i2v", "extend"), "flf2v": ("interpolate",), "i2v-a14b": ("i2v", "extend", "interpolate"),
                     "ti2v": ("t2v", "image", "remix", "i2v", "extend", "storyboard")}
    limits = describe_model(image_folders["i2v"][0])[1]
    assert limits.cond_at_ends  # one frame across a seam (pipeline/stages/modes.py), whatever its long-clip context
    folder = read_wan_folder(image_folders["i2v"][0])
    assert (folder.image_conditioning, folder.pipeline_class) == ("clip", "WanImageToVideoPipeline")
    assert any(f.startswith("image_encoder/") for f in folder.weight_files)  # in the digest


def test_an_image_folder_without_its_image_encoder_is_refused(image_folders, tmp_path):
    import json
    import shutil

    folder = tmp_path / "no-encoder"
    shutil.copytree(image_folders["i2v"][0], folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["image_encoder"] = index["image_processor"] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(WanFolderError, match=r"the transformer takes CLIP image states \(image_dim=8\) but there is "
                                             r"no image_encoder/ and image_processor/; supply them"):
        read_wan_folder(str(folder))


def test_a_clip_image_folder_is_refused_a_parallel_layout_before_loading(image_folders):
    from models.interface import ParallelConfig, ParallelConfigError, check_model_layout

    with pytest.raises(ParallelConfigError, match=r"^parallel layout sp=2 x tp=1 x cfg=1: Tiny-i2v-Diffusers takes "
                                                  r"CLIP image states, which parallel Wan does not split; render it "
                                                  r"on one rank$"):
        check_model_layout(image_folders["i2v"][0], ParallelConfig(sp=2))
