"""`reel render --codec ffv1`: lossless Matroska masters under videos/, the codec in the metadata and
in the resume key, and refusals before anything runs (a real local Ray, the shipped tiny model)."""

import hashlib
import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.media.encode import decode_mp4, probe_mp4

ROWS = [{"id": "clip", "prompt": "a red ball moves right on black", "seed": 3, "steps": 4},
        {"id": "still", "prompt": "a blue square on white", "mode": "image", "seed": 4, "steps": 4}]


def write_manifest(path, rows):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return str(path)


def render(manifest, out, *options):
    return main(["render", str(manifest), "--out", str(out), "--model", "tiny", "--no-progress", *options])


def metadata(out):
    return {m["id"]: m for m in pads.dataset(str(out / "metadata"), format="parquet").to_table().to_pylist()}


def counts(out):
    return json.loads((out / "run.json").read_text())["counts"]


def test_ffv1_masters_are_lossless_and_a_changed_codec_renders_again(ray_session, tmp_path, capsys):
    manifest, out = write_manifest(tmp_path / "m.parquet", ROWS), tmp_path / "out"
    assert render(manifest, out, "--codec", "ffv1") == 0
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["clip.mkv"]
    meta = metadata(out)
    clip, still = meta["clip"], meta["still"]
    data = (out / "videos" / "clip.mkv").read_bytes()
    assert (clip["codec"], clip["video_uri"], clip["image_uri"]) == ("ffv1", str(out / "videos" / "clip.mkv"), "")
    assert (clip["video_sha256"], clip["bytes"]) == (hashlib.sha256(data).hexdigest(), len(data))
    frames = decode_mp4(data)  # lossless: the decoded frames are the ones the writer hashed
    assert frames.shape == (clip["frames"], clip["height"], clip["width"], 3)
    assert hashlib.sha256(frames.tobytes()).hexdigest() == clip["frames_sha256"]
    assert probe_mp4(data)["codec"] == "ffv1" and (out / "thumbnails" / "clip.jpg").exists()
    assert (still["codec"], still["image_uri"]) == ("png", str(out / "images" / "still.png"))
    assert json.loads((out / "run.json").read_text())["config"]["codec"] == "ffv1"

    capsys.readouterr()
    assert main(["verify", str(out / "videos" / "clip.mkv")]) == 0
    assert "watermark: DETECTED" in capsys.readouterr().out

    assert render(manifest, out, "--codec", "ffv1") == 0
    assert counts(out) == {"rows": 2, "rendered": 0, "skipped": 2, "failed": 0}
    # Back to H.264: the video row renders again (the codec is in its request hash) and its .mkv goes;
    # the still is a PNG whatever the codec, so it is skipped.
    assert render(manifest, out) == 0
    assert counts(out) == {"rows": 2, "rendered": 1, "skipped": 1, "failed": 0}
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["clip.mp4"]
    clip = metadata(out)["clip"]
    assert (clip["codec"], clip["video_uri"]) == ("h264", str(out / "videos" / "clip.mp4"))
    assert probe_mp4((out / "videos" / "clip.mp4").read_bytes())["codec"] == "h264"


def test_c2pa_signing_with_ffv1_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("REEL_C2PA_KEY", str(tmp_path / "key.pem"))
    monkeypatch.setenv("REEL_C2PA_CERT", str(tmp_path / "cert.pem"))
    refusal = ("C2PA signing (REEL_C2PA_KEY/REEL_C2PA_CERT) cannot embed a manifest in the Matroska files --codec "
               "ffv1 writes; use --codec h264")
    out = tmp_path / "out"
    assert render(write_manifest(tmp_path / "m.parquet", ROWS[:1]), out, "--codec", "ffv1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"reel render: {refusal}") and "\n" not in err
    assert not out.exists()

    # `reel campaign render` hands its --codec to the same run (refused the same way, before Ray starts)
    spec = tmp_path / "c.yaml"
    spec.write_text("campaign: c\ntemplate: \"a {colour} ball\"\naxes:\n  colour: [red]\n"
                    "placements:\n  - {name: square, width: 64, height: 64, seconds: 0.5}\n")
    assert main(["campaign", "render", str(spec), "--out", str(out), "--model", "tiny", "--codec", "ffv1"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"reel render: {refusal}")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet"]  # the expanded manifest, kept


def test_an_unknown_codec_is_refused_by_the_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        render(write_manifest(tmp_path / "m.parquet", ROWS[:1]), tmp_path / "out", "--codec", "prores")
    assert exited.value.code == 2
    assert "argument --codec: invalid choice: 'prores'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
