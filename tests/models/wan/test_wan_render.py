"""`reel render --model <Wan folder>` end to end: a one-row manifest through the Ray pipeline (CLI in a
subprocess, a local Ray for the run) to an MP4 whose metadata names the Wan model and its digest; a layout
the folder cannot take is refused before Ray starts. The same with each replica a group of ranks (`--sp 2`,
`--tp 2`, `--cfg-parallel`, `--sp 2 --tp 2`) giving the one-rank frames: tests/pipeline/stages/
test_replica_wan.py (in-process on the session's Ray)."""

import json
import os
import subprocess
import sys

import pyarrow.dataset as pads

from models.interface import describe_model
from pipeline.media.encode import probe_mp4


def _cli_env(tmp_path) -> dict[str, str]:
    """The environment of a `reel render` subprocess: this tree, a local Ray of its own, a cache in tmp_path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), RAY_AUTH_MODE="disabled",
               REELFORGE_CACHE=str(tmp_path / "cache"))
    env.pop("RAY_ADDRESS", None)
    return env


def test_reel_render_a_wan_folder(wan_folders, tmp_path):
    folder = wan_folders["wan21"]
    manifest = tmp_path / "m.jsonl"
    # and a row past the 81-frame window: two windows of 21 latent frames (models/wan/windows.py)
    manifest.write_text("".join(json.dumps({"id": name, "prompt": "a red circle moves right", "width": 32,
                                            "height": 32, "frames": frames, "steps": 2, "seed": 3}) + "\n"
                                for name, frames in (("wan-clip", 5), ("wan-long", 85))))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "render", str(manifest), "--out", str(out),
                          "--model", folder, "--no-progress"], capture_output=True, text=True, env=_cli_env(tmp_path),
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]

    meta, long = sorted(pads.dataset(str(out / "metadata"), format="parquet").to_table().to_pylist(),
                        key=lambda m: m["id"])
    info = describe_model(folder)[0]
    assert meta["model"] == {"name": "Tiny-wan21-Diffusers", "version": "diffusers",
                             "weights_sha256": info.weights_sha256}
    assert (meta["id"], meta["width"], meta["height"], meta["frames"], meta["fps"], meta["steps"]) == (
        "wan-clip", 32, 32, 5, 16, 2)
    assert meta["seconds"] == 5 / 16 and meta["guidance"] == 5.0
    video = probe_mp4((out / "videos" / "wan-clip.mp4").read_bytes())
    assert (video["width"], video["height"], video["frames"]) == (32, 32, 5)
    assert (long["id"], long["frames"], long["seconds"]) == ("wan-long", 85, 85 / 16)
    video = probe_mp4((out / "videos" / "wan-long.mp4").read_bytes())
    assert (video["width"], video["height"], video["frames"]) == (32, 32, 85)
    assert json.loads((out / "run.json").read_text())["counts"]["rendered"] == 2


def test_a_layout_a_wan_folder_cannot_take_is_refused_before_ray_starts(wan_folders, tmp_path, capsys):
    from pipeline.cli import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "prompt": "a red circle"}) + "\n")
    folder = wan_folders["wan21"]
    assert main(["render", str(manifest), "--out", str(tmp_path / "out"), "--model", folder, "--tp", "4"]) == 2
    assert capsys.readouterr().err.strip() == (
        "reel render: parallel layout sp=1 x tp=4 x cfg=1: tp=4 must divide the heads (2), the width (24) and the "
        "MLP width (32)")
    assert not (tmp_path / "out").exists()
