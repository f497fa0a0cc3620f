"""The `lora` column: `reel render` on a tiny Wan folder applies a row's adapters (the frames are the
generator's with them, which tests/models/wan/test_wan_lora.py holds equal to diffusers'), renders the
row without any on the base model, and refuses an adapter that does not fit on its own row while the
others render (one run); the metadata records each adapter's URI, scale and sha256; the request hash
carries the adapters and the file's version, so resume renders a row again when its adapter changed.
Validation: the forms a row may give, a missing file, the default model refusing adapters per row."""

import hashlib
import json
import os

import pyarrow.parquet as pq
import pytest
import torch

from models.interface import LoraAdapter, RenderRequest, describe_model, load_generator
from pipeline.batch.manifest import manifest_table, validate
from pipeline.cli import main
from pipeline.errors import EXIT_ROWS_FAILED
from pipeline.media.watermark import embed_watermark
from tests.conftest import write_wan_lora

ROW = {"prompt": "a red circle moves right", "width": 32, "height": 32, "frames": 5, "steps": 2, "guidance": 4.0,
       "seed": 11}


def test_reel_render_applies_each_rows_adapters_and_refuses_a_misfit_on_its_row(ray_session, wan_folders, tmp_path):
    folder = wan_folders["wan21"]
    good = write_wan_lora(tmp_path / "style.safetensors", folder, seed=1)
    misfit = write_wan_lora(tmp_path / "misfit.safetensors", folder, seed=2, misfit=True)
    rows = [{"id": "styled", **ROW, "lora": [{"uri": good, "scale": 0.7}]},
            {"id": "misfit", **ROW, "lora": misfit},
            {"id": "plain", **ROW}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    code = main(["render", str(manifest), "--out", str(out), "--model", folder, "--no-progress", "--replicas", "1"])
    assert code == EXIT_ROWS_FAILED  # the misfit; the others rendered

    [error] = pq.read_table(out / "errors" / "errors.parquet").to_pylist()
    assert (error["id"], error["stage"]) == ("misfit", "render")
    assert error["reason"].startswith(f"lora: {misfit}: 20 of its 40 tensors do not fit this model")
    assert "\n" not in error["reason"]
    meta = {r["id"]: r for r in (pq.read_table(out / "metadata" / f"{i}.parquet").to_pylist()[0]
                                 for i in ("styled", "plain"))}
    sha = hashlib.sha256(open(good, "rb").read()).hexdigest()
    assert meta["styled"]["lora"] == [{"uri": good, "scale": 0.7, "sha256": sha}]
    assert meta["plain"]["lora"] is None

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a CPU replica renders
    try:
        gen = load_generator(folder, device="cpu")
        base = RenderRequest(caption=ROW["prompt"], width=32, height=32, frames=5, fps=16, seed=11, steps=2,
                             guidance=4.0)
        for clip_id, request in (("styled", RenderRequest(**{**base.__dict__, "lora": (LoraAdapter(good, 0.7),)})),
                                 ("plain", base)):
            [frames] = gen.generate([request])
            expected = hashlib.sha256(embed_watermark(frames.frames).tobytes()).hexdigest()
            assert meta[clip_id]["frames_sha256"] == expected, clip_id
    finally:
        torch.set_num_threads(threads)


def test_the_request_hash_carries_the_adapters_and_their_files_version(wan_folders, tmp_path):
    folder = wan_folders["wan21"]
    _, limits, _ = describe_model(folder)
    path = write_wan_lora(tmp_path / "a.safetensors", folder, seed=1)

    def spec(**extra):
        [s], errors = validate(manifest_table([{"id": "a", **ROW, **extra}]), limits)
        assert not errors, errors
        return s

    def key(s):
        return s.request_sha256(model_sha256="m", recaptioner="verbatim")

    plain, styled = spec(), spec(lora=path)
    assert plain.lora == () and styled.lora[0][:2] == (path, 1.0)
    assert key(spec(lora=json.dumps({"uri": path}))) == key(styled) != key(plain)
    assert key(spec(lora=json.dumps([{"uri": path, "scale": 0.5}]))) != key(styled)
    assert key(plain) == key(spec(lora=""))  # no adapter: the key a row had before the column existed
    st = os.stat(path)
    write_wan_lora(path, folder, seed=2)  # replaced at the same URI
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert key(spec(lora=path)) != key(styled)


@pytest.mark.parametrize(("value", "reason"), [
    ("/no/such/file.safetensors", "lora: file not found: /no/such/file.safetensors"),
    ('[{"uri": "x", "weight": 1}]', "lora has unknown field(s) weight (an adapter is {uri, scale})"),
    ('{"scale": 1}', "lora needs a uri: the adapter's safetensors file (a path or any fsspec URI)"),
    ('{"uri": "x", "scale": "much"}', "lora.scale must be a number, got 'much'"),
    ("[unparsable", "lora must be a URI, an object {uri, scale} or a list of them; got unparsable JSON"),
])
def test_a_bad_lora_value_fails_its_row(wan_folders, value, reason):
    _, limits, _ = describe_model(wan_folders["wan21"])
    specs, errors = validate(manifest_table([{"id": "bad", **ROW, "lora": value}, {"id": "ok", **ROW}]), limits)
    assert [s.id for s in specs] == ["ok"] and [(e.id, e.reason) for e in errors] == [("bad", reason)]


def test_the_default_model_refuses_adapters_per_row(tmp_path):
    _, limits, _ = describe_model("default")
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"")
    rows = [{"id": "styled", "prompt": "a red circle", "lora": str(path)}, {"id": "plain", "prompt": "a red circle"}]
    specs, errors = validate(manifest_table(rows), limits)
    assert [s.id for s in specs] == ["plain"]
    assert [(e.id, e.reason) for e in errors] == [
        ("styled", "lora: this model takes no LoRA adapters (they are for diffusers Wan folders)")]
