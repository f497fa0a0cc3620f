"""Wan through reelforge's generator interface renders what diffusers' WanPipeline renders.

For each variant (Wan 2.1 T2V, Wan 2.2 TI2V-5B, Wan 2.2 A14B), `load_generator(folder).generate`
and the pipeline get the same prompt, negative prompt, seed, size, frames, steps and guidance; the
pipeline's `output_type="np"` frames (float in [0, 1]) become uint8 as `(x * 255).round()`, the
conversion the generator uses. The frames are equal to the bit.
"""

import dataclasses

import numpy as np
import pytest
import torch

from models.interface import ParallelConfig, ParallelConfigError, RenderRequest, describe_model, load_generator

REQUEST = RenderRequest(caption="  a red  circle moves right &amp; the  blue square falls ", width=32, height=32,
                        frames=9, fps=16, seed=7, steps=3, guidance=5.0, negative_caption="blurry static ugly")


def pipeline_frames(pipe, r: RenderRequest) -> np.ndarray:
    extra = {} if r.guidance_2 is None else {"guidance_scale_2": r.guidance_2}
    out = pipe(prompt=r.caption, negative_prompt=r.negative_caption, height=r.height, width=r.width,
               num_frames=r.frames, num_inference_steps=r.steps, guidance_scale=r.guidance,
               generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np", **extra).frames[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("variant", ["wan21", "ti2v", "a14b"])
@pytest.mark.parametrize("frames", [9, 1], ids=["video", "still"])
def test_frames_equal_diffusers_wan_pipeline(variant, frames, generators, wan_pipelines):
    r = dataclasses.replace(REQUEST, frames=frames)
    [out] = generators[variant].generate([r])
    expected = pipeline_frames(wan_pipelines[variant][1], r)
    assert out.frames.shape == (frames, 32, 32, 3) and out.frames.dtype == np.uint8
    assert np.array_equal(out.frames, expected)
    assert out.frames.std() > 1  # not a flat picture
    assert set(out.timings) == {"text", "sample", "decode"} and all(v >= 0 for v in out.timings.values())


def test_a14b_low_noise_expert_takes_guidance_2_and_no_cfg_below_guidance_1(generators, wan_pipelines):
    gen, pipe = generators["a14b"], wan_pipelines["a14b"][1]
    r = dataclasses.replace(REQUEST, frames=5, guidance=4.0, guidance_2=1.5)
    [out] = gen.generate([r])
    assert np.array_equal(out.frames, pipeline_frames(pipe, r))
    [same_g2] = gen.generate([dataclasses.replace(r, guidance_2=None, guidance=4.0)])
    assert not np.array_equal(out.frames, same_g2.frames)  # the low-noise expert ran, with its own guidance
    no_cfg = dataclasses.replace(r, guidance=1.0, guidance_2=None, negative_caption="")
    [plain] = gen.generate([no_cfg])
    assert np.array_equal(plain.frames, pipeline_frames(pipe, no_cfg))


def test_the_same_request_gives_the_same_frames_whatever_the_batch(generators):
    gen = generators["wan21"]
    r = dataclasses.replace(REQUEST, frames=5, steps=2)
    [alone] = gen.generate([r])
    _, again = gen.generate([dataclasses.replace(r, seed=8), r])
    assert np.array_equal(alone.frames, again.frames)


def test_limits_info_and_refusals(generators, wan_folders):
    gen = generators["wan21"]
    info, limits, recaptioner = describe_model(wan_folders["wan21"])
    assert info == gen.info and limits == gen.limits and recaptioner == "verbatim"
    assert (info.name, info.version, len(info.weights_sha256)) == ("Tiny-wan21-Diffusers", "diffusers", 64)
    assert (limits.default_width, limits.default_height, limits.default_fps, limits.default_steps,
            limits.default_guidance, limits.frame_multiple, limits.frame_offset, limits.size_multiple) == (
        832, 480, 16, 50, 5.0, 4, 1, 16)
    assert limits.frames_for(limits.default_seconds, limits.default_fps) == 81 == limits.window_frames
    assert limits.max_frames == 321  # 20 s at 16 fps, in windows (models/wan/windows.py)
    ti2v = generators["ti2v"].limits
    assert (ti2v.default_width, ti2v.default_height, ti2v.window_frames, ti2v.max_frames, ti2v.default_fps,
            ti2v.size_multiple) == (1280, 704, 121, 481, 24, 32)
    assert generators["a14b"].limits.has_guidance_2 and not limits.has_guidance_2

    with pytest.raises(ValueError, match=r"^frames=8 is not on the model's grid; nearest allowed is 9 "
                                         r"\(1 \+ a multiple of 4, from 1 to 321\)$"):
        gen.generate([dataclasses.replace(REQUEST, frames=8)])
    with pytest.raises(ValueError, match="^guidance_2 is for a model with a low-noise expert"):
        gen.generate([dataclasses.replace(REQUEST, guidance_2=2.0)])
    still = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"^Tiny-wan21-Diffusers takes no given frames \(image→video, extension, "
                                         r"interpolation, storyboards\): it renders t2v, image, remix$"):
        gen.generate([dataclasses.replace(REQUEST, cond_frames=still, cond_index=(0,))])
    assert limits.modes == ("t2v", "image", "remix") and describe_model("default")[1].modes[0] == "t2v"
    with pytest.raises(ParallelConfigError, match=r"^parallel layout sp=1 x tp=4 x cfg=1: tp=4 must divide the heads "
                                                  r"\(2\), the width \(24\) and the MLP width \(32\)$"):
        load_generator(wan_folders["wan21"], device="cpu", parallel=ParallelConfig(tp=4))


def test_bf16_transformers_keep_diffusers_fp32_modules(wan_folders, generators):
    """bf16 is `from_pretrained(torch_dtype=torch.bfloat16)`: weights in `_keep_in_fp32_modules` stay fp32,
    the rest is the checkpoint cast to bf16; the VAE stays fp32; a bf16 render is close to the fp32 one."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    from models.wan.folder import component_weight_files, read_wan_folder
    from models.wan.generator import WanVideoGenerator

    folder = read_wan_folder(wan_folders["ti2v"])
    bf16 = WanVideoGenerator(folder, device="cpu", dtype="bfloat16")
    saved = {}
    for shard in component_weight_files(folder.path, "transformer"):
        saved.update(load_file(f"{folder.path}/transformer/{shard}"))
    keep = WanTransformer3DModel._keep_in_fp32_modules
    state = bf16.transformer.state_dict()
    assert set(state) == set(saved) and keep
    for key, value in state.items():
        assert value.dtype == (torch.float32 if any(m in key.split(".") for m in keep) else torch.bfloat16), key
        assert torch.equal(value, saved[key].to(value.dtype)), key
    assert (bf16.transformer_dtype, bf16.text_encoder.dtype, bf16.vae.dtype, bf16.precision) == (
        torch.bfloat16, torch.bfloat16, torch.float32, "bfloat16")
    r = dataclasses.replace(REQUEST, frames=5)
    [low] = bf16.generate([r])
    [full] = generators["ti2v"].generate([r])
    assert np.abs(low.frames.astype(int) - full.frames).mean() < 2


def test_weights_that_do_not_fit_the_config_are_one_line(wan_folders, tmp_path):
    """A transformer config.json of another release (wider) over these weights: refused in one line."""
    import json
    import shutil

    from models.wan.folder import WanFolderError

    folder = shutil.copytree(wan_folders["wan21"], tmp_path / "Wan-mixed")
    config = json.loads((folder / "transformer" / "config.json").read_text())
    (folder / "transformer" / "config.json").write_text(json.dumps({**config, "ffn_dim": 64}))
    with pytest.raises(WanFolderError) as e:
        load_generator(str(folder), device="cpu")
    message = str(e.value)
    assert message.startswith(f"Wan folder {folder}: transformer/ does not load (") and "\n" not in message
    assert message.endswith("supply its config.json and weights from the same release")
