"""LoRA adapters on a Wan generator render what diffusers renders with `WanPipeline.load_lora_weights` +
`set_adapters` (to the bit: the same PEFT layers, unfused, in the same fp32 ops); the original Wan /
ComfyUI key names convert to the same adapter; an adapter whose keys do not fit the model is refused in
one line and leaves the base model; the next request without adapters renders on the base model exactly.
A few-step distilled folder (its own scheduler, reelforge.json's steps and guidance) renders what its
WanPipeline renders with them. Requests are 32x32, 5 frames, 2 steps."""

import dataclasses
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from models.interface import LoraAdapter, RenderRequest, describe_model, load_generator
from models.wan.folder import WanFolderError
from models.wan.lora import WanLoraError
from tests.conftest import write_wan_lora

REQUEST = RenderRequest(caption="a red circle moves right", width=32, height=32, frames=5, fps=16, seed=7, steps=2,
                        guidance=5.0, negative_caption="blurry")


def pipeline_frames(pipe, r: RenderRequest) -> np.ndarray:
    out = pipe(prompt=r.caption, negative_prompt=r.negative_caption, height=r.height, width=r.width,
               num_frames=r.frames, num_inference_steps=r.steps, guidance_scale=r.guidance,
               generator=torch.Generator("cpu").manual_seed(r.seed), output_type="np").frames[0]
    return (out * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def adapters(wan_folders, tmp_path_factory):
    """Random adapters for the tiny Wan 2.1 folder: two in diffusers' names, the first again in ComfyUI's,
    one a column too wide."""
    root, folder = tmp_path_factory.mktemp("lora"), wan_folders["wan21"]
    return {"a": write_wan_lora(root / "a.safetensors", folder, seed=1),
            "b": write_wan_lora(root / "b.safetensors", folder, seed=2, rank=2),
            "a_comfy": write_wan_lora(root / "a_comfy.safetensors", folder, seed=1, names="comfy"),
            "misfit": write_wan_lora(root / "misfit.safetensors", folder, seed=3, misfit=True)}


def test_adapters_render_what_diffusers_load_lora_weights_and_set_adapters_render(generators, wan_pipelines,
                                                                                  adapters):
    gen, pipe = generators["wan21"], wan_pipelines["wan21"][1]
    styled = dataclasses.replace(REQUEST, lora=(LoraAdapter(adapters["a"], 0.7), LoraAdapter(adapters["b"], -0.5)))
    [base] = gen.generate([REQUEST])
    [out] = gen.generate([styled])
    try:
        pipe.load_lora_weights(adapters["a"], adapter_name="a")
        pipe.load_lora_weights(adapters["b"], adapter_name="b")
        pipe.set_adapters(["a", "b"], [0.7, -0.5])
        expected = pipeline_frames(pipe, styled)
    finally:
        pipe.unload_lora_weights()
    assert np.array_equal(out.frames, expected)  # bitwise
    assert np.abs(out.frames.astype(int) - base.frames).mean() > 2  # the adapters changed the clip
    # the same adapters again stay loaded (no reload), and the next request without any is the base model
    [again] = gen.generate([styled])
    [after] = gen.generate([REQUEST])
    assert np.array_equal(again.frames, out.frames) and np.array_equal(after.frames, base.frames)
    assert np.array_equal(after.frames, pipeline_frames(pipe, REQUEST))
    assert not any("lora" in name for name, _ in gen.transformer.named_modules())  # unloaded, not just disabled


def test_comfyui_names_convert_to_the_same_adapter(generators, adapters):
    gen = generators["wan21"]
    [diffusers_named] = gen.generate([dataclasses.replace(REQUEST, lora=(LoraAdapter(adapters["a"], 0.8),))])
    [comfy_named] = gen.generate([dataclasses.replace(REQUEST, lora=(LoraAdapter(adapters["a_comfy"], 0.8),))])
    assert np.array_equal(comfy_named.frames, diffusers_named.frames)


def test_an_adapter_that_does_not_fit_is_refused_in_one_line_and_leaves_the_base_model(generators, adapters,
                                                                                      tmp_path):
    gen = generators["wan21"]
    [base] = gen.generate([REQUEST])
    from safetensors.torch import save_file

    save_file({"transformer.blocks.0.attn9.to_q.lora_A.weight": torch.zeros(2, 24)}, tmp_path / "other.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"not a safetensors file at all")
    cases = {adapters["misfit"]: r"20 of its 40 tensors do not fit this model \(blocks\.0\.attn1\.to_k\.lora_A\."
                                 r"weight is \(4, 25\), the layer takes \(4, 24\)\); it is for another checkpoint \w+$",
             str(tmp_path / "other.safetensors"): "none of its 1 keys names a layer of this model",
             str(tmp_path / "pickle.safetensors"): "is not a readable safetensors file",
             str(tmp_path / "missing.safetensors"): "lora: lora file not found: "}
    for uri, message in cases.items():
        with pytest.raises(WanLoraError, match=message) as e:
            gen.generate([dataclasses.replace(REQUEST, lora=(LoraAdapter(uri),))])
        assert "\n" not in str(e.value)
        [after] = gen.generate([REQUEST])
        assert np.array_equal(after.frames, base.frames), uri


def test_the_default_model_takes_no_adapters():
    info, limits, _ = describe_model("default")
    assert not limits.takes_lora
    r = RenderRequest(caption="a red circle", width=64, height=64, frames=16, fps=8, seed=1, steps=2, guidance=4.5,
                      lora=(LoraAdapter("/x.safetensors"),))
    with pytest.raises(ValueError, match=r"^lora: this model takes no LoRA adapters"):
        limits.check(r)


def test_adapter_records_give_each_files_sha256(adapters):
    from models.interface import lora_records

    records = lora_records((LoraAdapter(adapters["a"], 0.5),))
    with open(adapters["a"], "rb") as f:
        assert records == [{"uri": adapters["a"], "scale": 0.5, "sha256": hashlib.sha256(f.read()).hexdigest()}]


def test_an_adapter_on_s3_is_cached_once_and_fetched_again_when_replaced(adapters, bucket, tmp_path, monkeypatch):
    import fsspec

    import models.files
    from models.files import file_version, local_model_file

    monkeypatch.setattr(models.files, "CACHE_DIR", tmp_path / "cache")
    fs, uri = fsspec.filesystem("s3"), f"s3://{bucket}/loras/a.safetensors"
    fs.put(adapters["a"], uri)
    version = file_version(uri)
    copy = local_model_file(uri)
    assert copy.startswith(str(tmp_path / "cache")) and open(copy, "rb").read() == open(adapters["a"], "rb").read()
    assert local_model_file(uri) == copy
    fs.put(adapters["b"], uri)  # replaced at the same URI
    assert file_version(uri) != version
    fresh = local_model_file(uri)
    assert fresh != copy and open(fresh, "rb").read() == open(adapters["b"], "rb").read()
    assert file_version(f"s3://{bucket}/loras/none.safetensors") is None


@pytest.fixture(scope="module")
def distilled_folder(wan_pipelines, tmp_path_factory):
    """The tiny Wan 2.1 folder as a few-step distill: FlowMatchEuler (shift 5) and reelforge.json's 4 steps,
    guidance 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    folder = str(tmp_path_factory.mktemp("distill") / "Tiny-Distill")
    shutil.copytree(wan_pipelines["wan21"][0], folder)
    FlowMatchEulerDiscreteScheduler(shift=5.0).save_pretrained(f"{folder}/scheduler")
    index = json.load(open(f"{folder}/model_index.json"))
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    json.dump(index, open(f"{folder}/model_index.json", "w"))
    json.dump({"default_steps": 4, "default_guidance": 1.0}, open(f"{folder}/reelforge.json", "w"))
    return folder, WanPipeline.from_pretrained(folder)


def test_a_few_step_distill_takes_steps_guidance_and_scheduler_from_its_folder(distilled_folder, tmp_path):
    from pipeline.batch.manifest import manifest_table, validate

    folder, pipe = distilled_folder
    _, limits, _ = describe_model(folder)
    assert (limits.default_steps, limits.default_guidance) == (4, 1.0)
    [spec], _ = validate(manifest_table([{"id": "a", "prompt": "a red circle", "width": 32, "height": 32,
                                          "frames": 5}]), limits)
    assert (spec.steps, spec.guidance) == (4, 1.0)  # a row that names neither gets the folder's
    r = dataclasses.replace(REQUEST, steps=spec.steps, guidance=spec.guidance, negative_caption="")
    [out] = load_generator(folder, device="cpu").generate([r])
    assert np.array_equal(out.frames, pipeline_frames(pipe, r))

    bad = str(tmp_path / "bad")
    shutil.copytree(folder, bad)
    json.dump({"default_steps": 0, "steps": 4}, open(f"{bad}/reelforge.json", "w"))
    with pytest.raises(WanFolderError, match="reelforge.json must be a JSON object with keys among default_steps, "
                                             "default_guidance, .*, got keys steps"):
        describe_model(bad)
    # a default guidance no request could ask for is refused with the folder, not on every row
    json.dump({"default_guidance": 50}, open(f"{bad}/reelforge.json", "w"))
    with pytest.raises(WanFolderError, match=r"reelforge.json: default_guidance=50 must be a number in 0\.\.30$"):
        describe_model(bad)
