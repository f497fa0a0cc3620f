"""Precision and offload through `load_generator`: what each model takes (`check_load_options`, one line
for what it does not), the precision a generator reports, and `offload` giving the same frames."""

import dataclasses

import numpy as np
import pytest
import torch

from models.interface import ConfigError, RenderRequest, check_load_options, load_generator

REQUEST = RenderRequest(caption="a green ball falls", width=32, height=32, frames=5, fps=16, seed=5, steps=2,
                        guidance=5.0, negative_caption="static")


def test_offload_keeps_the_idle_expert_and_text_encoder_on_the_cpu_with_the_same_frames(wan_folders, generators):
    """On a CPU the devices are one, so the frames cannot change; what is checked is that offloading is
    accepted and moves each module to the device only while it runs, the others back to the CPU first."""
    gen = load_generator(wan_folders["a14b"], device="cpu", offload=True)
    moves = []  # (module, "up" to the generator's device | "down" to the CPU), in order
    for name in ("text_encoder", "transformer", "transformer_2"):
        module = getattr(gen, name)
        module.to = lambda device, name=name, to=module.to: moves.append(
            (name, "up" if device is gen.device else "down")) or to(device)
    r = dataclasses.replace(REQUEST, steps=3)  # timesteps 999 (transformer), then 857, 600 (transformer_2)
    [out] = gen.generate([r])
    assert np.array_equal(out.frames, generators["a14b"].generate([r])[0].frames)
    ups = [name for name, way in moves if way == "up"]
    assert ups == ["text_encoder", "text_encoder", "transformer", "transformer_2", "transformer_2"]  # one a step
    first_low = moves.index(("transformer_2", "up"))
    assert {("transformer", "down"), ("text_encoder", "down")} <= set(moves[first_low - 2:first_low])


def test_what_each_model_takes(wan_folders, tiny_generator):
    for dtype in ("float32", "bfloat16", "float16", None):
        check_load_options(wan_folders["ti2v"], dtype, offload=True)
    check_load_options("tiny", "bfloat16")
    with pytest.raises(ConfigError, match=r"^dtype float16 is not one this model renders in \(float32, bfloat16\)$"):
        check_load_options("tiny", "float16")
    with pytest.raises(ConfigError, match="^dtype int8 is not one a Wan folder renders in"):
        load_generator(wan_folders["wan21"], device="cpu", dtype="int8")
    with pytest.raises(ConfigError, match="^offload is for diffusers Wan folders"):
        load_generator("tiny", device="cpu", offload=True)

    # the default model: fp32 weights; float32 is its CPU default (no autocast), bfloat16 autocasts
    r = RenderRequest(caption="a red circle", width=64, height=64, frames=8, fps=8, seed=3, steps=2, guidance=4.5)
    fp32 = load_generator("tiny", device="cpu", dtype="float32")
    assert (fp32.precision, tiny_generator.precision, fp32.autocast_dtype) == ("float32", "float32", None)
    assert np.array_equal(fp32.generate([r])[0].frames, tiny_generator.generate([r])[0].frames)
    bf16 = load_generator("tiny", device="cpu", dtype="bfloat16")
    assert (bf16.precision, bf16.autocast_dtype) == ("bfloat16", torch.bfloat16)
    low = bf16.generate([r])[0].frames
    assert np.abs(low.astype(int) - fp32.generate([r])[0].frames).mean() < 8
