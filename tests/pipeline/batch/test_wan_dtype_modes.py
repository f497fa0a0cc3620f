"""`reel render --model <Wan folder> --dtype --offload` with rows of every kind a text-to-video checkpoint
meets: a still and a remix render (metadata records the precision), an i2v row fails alone with the
modes the model renders; a precision or offload the model cannot take exits 2 before Ray starts."""

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline.media.encode import encode_mp4, encode_png


def test_wan_rows_by_mode_with_dtype_and_offload(wan_folders, tmp_path):
    video = np.zeros((9, 32, 32, 3), np.uint8)
    video[..., 2] = 120
    for i in range(9):
        video[i, 8:20, 2 + 2 * i:14 + 2 * i] = 240
    (tmp_path / "in.mp4").write_bytes(encode_mp4(video, 16))
    (tmp_path / "in.png").write_bytes(encode_png(video[0]))
    rows = [{"id": "still", "prompt": "a red circle", "mode": "image", "width": 32, "height": 32, "steps": 2},
            {"id": "remix", "prompt": "a blue square", "video": str(tmp_path / "in.mp4"), "strength": 0.5,
             "steps": 2, "seed": 4},
            {"id": "i2v", "prompt": "a cat", "image": str(tmp_path / "in.png"), "steps": 2}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RAY_AUTH_MODE="disabled",
               REELFORGE_CACHE=str(tmp_path / "cache"))
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "render", str(manifest), "--out", str(out), "--model",
                          wan_folders["wan21"], "--dtype", "float32", "--offload", "--no-progress"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-4000:]

    meta = {m["id"]: m for m in pads.dataset(str(out / "metadata"), format="parquet").to_table().to_pylist()}
    assert sorted(meta) == ["remix", "still"]
    assert (meta["still"]["frames"], meta["still"]["image_uri"], meta["still"]["dtype"]) == (
        1, str(out / "images" / "still.png"), "float32")
    assert (meta["remix"]["frames"], meta["remix"]["width"], meta["remix"]["strength"], meta["remix"]["dtype"]) == (
        9, 32, 0.5, "float32")
    [error] = pads.dataset(str(out / "errors"), format="parquet").to_table().to_pylist()
    assert (error["id"], error["stage"], error["reason"]) == (
        "i2v", "validate", "mode i2v is not one this model renders; it renders t2v, image, remix")
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["dtype"], config["offload"]) == ("float32", True)


@pytest.mark.parametrize("options,message", [
    (["--dtype", "float16"], "dtype float16 is not one this model renders in (float32, bfloat16)"),
    (["--offload"], "offload is for diffusers Wan folders (their text encoder and experts); this model fits its "
                    "device whole"),
])
def test_a_precision_the_model_cannot_take_exits_2_before_anything(options, message, tmp_path, capsys):
    from pipeline.cli import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "prompt": "a red circle"}) + "\n")
    assert main(["render", str(manifest), "--out", str(tmp_path / "out"), "--model", "tiny", *options]) == 2
    assert capsys.readouterr().err.strip() == f"reel render: {message}"
    assert not (tmp_path / "out").exists()


def test_the_precision_asked_for_is_part_of_the_request():
    from pipeline.batch.manifest import ClipSpec

    spec = ClipSpec(0, "a", "p", "", 32, 32, 5, 16, 1, 2, 5.0, "t2v")
    hashes = {d: spec.request_sha256(model_sha256="m", recaptioner="plain", dtype=d)
              for d in (None, "float32", "bfloat16")}
    assert len(set(hashes.values())) == 3
    assert hashes[None] == spec.request_sha256(model_sha256="m", recaptioner="plain")  # unchanged without --dtype


def test_reel_serve_refuses_a_precision_the_model_cannot_take_before_ray(tmp_path, capsys):
    from pipeline.cli import main

    keys = tmp_path / "keys"
    keys.write_text("sk-test\n")
    assert main(["serve", "--model", "tiny", "--out", str(tmp_path / "out"), "--api-key-file", str(keys),
                 "--dtype", "float16"]) == 2
    assert capsys.readouterr().err.strip() == (
        "reel serve: dtype float16 is not one this model renders in (float32, bfloat16)")


def test_a_wan_folder_renders_the_same_frames_with_its_stages_apart(ray_session, wan_folders, tmp_path):
    """`--disaggregate` on a Wan folder: umT5 in the text actor, the VAE in the decode actor, the sampling
    replica without a text encoder; a text→video row, a still and a remix (all handed over as latents) give the
    stages-together run's frames, to the bit."""
    from pipeline import storage
    from pipeline.batch.driver import RenderConfig, render_manifest

    video = np.full((9, 32, 32, 3), 90, np.uint8)
    (tmp_path / "in.mp4").write_bytes(encode_mp4(video, 16))
    rows = [{"id": "t2v", "prompt": "a red circle", "width": 32, "height": 32, "frames": 5, "steps": 2},
            {"id": "still", "prompt": "a cat", "mode": "image", "width": 32, "height": 32, "steps": 2},
            {"id": "remix", "prompt": "a blue square", "video": str(tmp_path / "in.mp4"), "strength": 0.5,
             "steps": 2}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    hashes = {}
    for apart in (False, True):
        out = str(tmp_path / f"out-{apart}")
        summary = render_manifest(RenderConfig(manifest=str(manifest), out=out, model=wan_folders["wan21"],
                                               progress=False, disaggregate=apart))
        assert summary.rendered == 3, summary.errors
        meta = storage.read_parquet_dataset(f"{out}/metadata").to_pylist()
        hashes[apart] = {m["id"]: m["frames_sha256"] for m in meta}
    assert hashes[True] == hashes[False]
