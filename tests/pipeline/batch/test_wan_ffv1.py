"""`reel render --model <Wan folder> --codec ffv1` end to end gives diffusers' `WanPipeline` frames, to the
watermark: for a Wan 2.1 T2V, a TI2V-5B-style and an A14B-style folder (the tiny session fixtures),
the decoded Matroska master equals `embed_watermark` of the pipeline's frames for the same prompt,
negative prompt, seed, size, frames, steps and guidance, so it is within the mark's ±3 levels of them.
A still (`mode=image`) in the same runs is `WanPipeline(num_frames=1)`'s frame, marked, as a PNG.
A folder that cannot be used stops `reel render` in one line, exit 2, before anything is written.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from models.interface import describe_model
from pipeline.cli import main
from pipeline.media.encode import decode_mp4
from pipeline.media.watermark import AMPLITUDE, embed_watermark

VARIANTS = ("wan21", "ti2v", "a14b")
# Wan's recaptioner is verbatim: the caption the model gets is the prompt diffusers gets, as written.
ROW = {"id": "clip", "prompt": "a red circle moves right", "negative_prompt": "blurry static", "width": 32,
       "height": 32, "frames": 5, "steps": 2, "guidance": 4.0, "seed": 11}
STILL = {**{k: v for k, v in ROW.items() if k != "frames"}, "id": "still", "mode": "image"}


@pytest.fixture(scope="module")
def renders(wan_folders, tmp_path_factory):
    """{variant: OUT} of three `reel render --codec ffv1` runs, one per folder (one model per run), in
    one subprocess: the runs share its local Ray."""
    root = tmp_path_factory.mktemp("wan-ffv1")
    manifest = root / "m.jsonl"
    manifest.write_text(json.dumps(ROW) + "\n" + json.dumps(STILL) + "\n")
    runs = [["render", str(manifest), "--out", str(root / v), "--model", wan_folders[v], "--codec", "ffv1",
             "--no-progress"] for v in VARIANTS]
    script = f"import sys\nfrom pipeline.cli import main\nsys.exit(max([main(argv) for argv in {runs!r}]))\n"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RAY_AUTH_MODE="disabled",
               REELFORGE_CACHE=str(root / "cache"))
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return {v: root / v for v in VARIANTS}


def diffusers_frames(pipe, frames: int = ROW["frames"]) -> np.ndarray:
    out = pipe(prompt=ROW["prompt"], negative_prompt=ROW["negative_prompt"], height=ROW["height"], width=ROW["width"],
               num_frames=frames, num_inference_steps=ROW["steps"], guidance_scale=ROW["guidance"],
               generator=torch.Generator("cpu").manual_seed(ROW["seed"]), output_type="np").frames[0]
    return (out * 255).round().astype(np.uint8)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reel_render_ffv1_gives_wan_pipeline_frames_to_the_watermark(variant, renders, wan_pipelines):
    out = renders[variant]
    folder, pipe = wan_pipelines[variant]
    meta = pq.read_table(out / "metadata" / "clip.parquet").to_pylist()[0]
    data = (out / "videos" / "clip.mkv").read_bytes()
    assert (meta["codec"], meta["video_uri"], meta["video_sha256"]) == (
        "ffv1", str(out / "videos" / "clip.mkv"), hashlib.sha256(data).hexdigest())
    assert meta["caption"] == ROW["prompt"] and meta["negative_prompt"] == ROW["negative_prompt"]
    assert meta["model"] == {"name": os.path.basename(folder), "version": "diffusers",
                             "weights_sha256": describe_model(folder)[0].weights_sha256}
    fps = 24 if variant == "ti2v" else 16
    assert (meta["width"], meta["height"], meta["frames"], meta["fps"], meta["seconds"], meta["steps"]) == (
        32, 32, 5, fps, 5 / fps, 2)
    assert (meta["guidance"], meta["seed"]) == (4.0, 11)

    frames = decode_mp4(data)
    assert hashlib.sha256(frames.tobytes()).hexdigest() == meta["frames_sha256"]  # the master is lossless
    expected = diffusers_frames(pipe)
    assert frames.shape == expected.shape == (5, 32, 32, 3) and expected.std() > 1
    assert np.array_equal(frames, embed_watermark(expected))
    difference = np.abs(frames.astype(int) - expected)
    assert 0 < difference.max() <= AMPLITUDE  # measured: 3, the mark's amplitude (mean 2.98)


def test_reel_verify_reports_the_watermark_of_a_wan_master(renders, capsys):
    assert main(["verify", str(renders["ti2v"] / "videos" / "clip.mkv")]) == 0
    report = capsys.readouterr().out
    assert "mkv 32x32, 5 frame(s)" in report and "watermark: DETECTED" in report
    assert "model=Tiny-ti2v-Diffusers" in report and "caption hash: matches the comment tag" in report


def _break(folder, how):
    if how == "truncated shard":
        shard = sorted((folder / "transformer").glob("*.safetensors"))[1]
        shard.write_bytes(shard.read_bytes()[:-100])
        return f"transformer/{shard.name} is "
    if how == "missing component":
        shutil.rmtree(folder / "vae")
        return "model_index.json names a vae but there is no vae/ folder"
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    return "model_index.json is for 'StableDiffusionPipeline'; only WanPipeline"


@pytest.mark.parametrize("how", ["truncated shard", "missing component", "wrong model_index"])
def test_an_unusable_wan_folder_exits_2_in_one_line_and_writes_nothing(how, wan_folders, tmp_path, capsys):
    folder = shutil.copytree(wan_folders["wan21"], tmp_path / "Wan-broken")
    said = _break(folder, how)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(ROW) + "\n" + json.dumps(STILL) + "\n")
    out = tmp_path / "out"
    assert main(["render", str(manifest), "--out", str(out), "--model", str(folder), "--codec", "ffv1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"reel render: cannot load model '{folder}': Wan folder {folder}") and said in err
    assert err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_wan_still_is_wan_pipelines_one_frame_to_the_watermark(variant, renders, wan_pipelines):
    from PIL import Image

    out = renders[variant]
    meta = pq.read_table(out / "metadata" / "still.parquet").to_pylist()[0]
    assert (meta["mode"], meta["frames"], meta["codec"], meta["image_uri"]) == (
        "image", 1, "png", str(out / "images" / "still.png"))
    with Image.open(out / "images" / "still.png") as im:
        still = np.asarray(im.convert("RGB"))
    expected = diffusers_frames(wan_pipelines[variant][1], frames=1)
    assert expected.shape == (1, 32, 32, 3) and expected.std() > 1
    assert np.array_equal(still, embed_watermark(expected)[0])
