"""The whole batch pipeline on a real local Ray: manifest → recaption → render → MP4 + metadata."""

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.cli import main
from pipeline.media.encode import probe_mp4

MODEL = "tiny"
GOOD = [
    {"id": "red-ball", "prompt": "a red ball moves right on black", "campaign": "spring"},
    {"id": "blue-square", "prompt": "blue square drifting left, gray backdrop", "seed": 7, "campaign": "spring"},
    {"id": "wide", "prompt": "a white circle falls", "width": 96, "height": 64, "seconds": 1, "campaign": "summer"},
]
BAD = [
    {"id": "red-ball", "prompt": "a second red ball"},  # duplicate id
    {"id": "../escape", "prompt": "path traversal"},
    {"id": "empty", "prompt": ""},
    {"id": "offgrid", "prompt": "p", "width": 70},
]


def write_manifest(path, rows):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in columns}), path)
    return str(path)


def render(*args):
    return main(["render", *map(str, args), "--model", MODEL, "--no-progress"])


def read_dataset(uri):
    fs, path = storage.resolve(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table()


def test_end_to_end_with_bad_rows_and_resume(ray_session, tmp_path):
    manifest = write_manifest(tmp_path / "m.parquet", GOOD + BAD)
    out = tmp_path / "out"
    assert render(manifest, "--out", out) == 3

    meta = read_dataset(str(out / "metadata")).to_pylist()
    assert sorted(m["id"] for m in meta) == ["blue-square", "red-ball", "wide"]
    by_id = {m["id"]: m for m in meta}
    wide = by_id["wide"]
    assert (wide["width"], wide["height"], wide["frames"], wide["fps"], wide["seconds"]) == (96, 64, 8, 8, 1.0)
    assert by_id["blue-square"]["seed"] == 7 and by_id["red-ball"]["campaign"] == "spring"
    assert by_id["red-ball"]["caption"] == "A red ball moves right on black."
    assert by_id["red-ball"]["prompt"] == "a red ball moves right on black"
    for m in meta:
        assert m["model"]["name"] and len(m["model"]["weights_sha256"]) == 64
        assert m["timings"]["sample"] > 0 and m["timings"]["encode"] > 0
        data = (out / "videos" / f"{m['id']}.mp4").read_bytes()
        assert storage.read_bytes(m["video_uri"]) == data and len(data) == m["bytes"]
        info = probe_mp4(data)
        assert (info["codec"], info["pix_fmt"], info["width"], info["height"], info["frames"]) == (
            "h264", "yuv420p", m["width"], m["height"], m["frames"])
        assert info["faststart"]
        assert (out / "thumbnails" / f"{m['id']}.jpg").read_bytes()[:2] == b"\xff\xd8"

    errors = {e["row"]: e for e in read_dataset(str(out / "errors")).to_pylist()}
    assert sorted(errors) == [3, 4, 5, 6]
    assert errors[3]["reason"] == "duplicate id 'red-ball' (first used on row 0)"
    assert errors[5]["reason"] == "prompt is empty" and errors[5]["stage"] == "validate"
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"rows": 7, "rendered": 3, "skipped": 0, "failed": 4}
    assert run["exit_code"] == 3 and run["versions"]["ray"]

    # Rerun: nothing renders again; the same bytes stay in place.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()}
    assert render(manifest, "--out", out) == 3
    assert {p.name: p.stat().st_mtime_ns for p in (out / "videos").iterdir()} == mtimes
    assert json.loads((out / "run.json").read_text())["counts"]["skipped"] == 3
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]

    # A changed row is rendered again, the others are skipped; the good-only manifest exits 0.
    changed = [dict(GOOD[0], seed=99), *GOOD[1:]]
    assert render(write_manifest(tmp_path / "m2.parquet", changed), "--out", out) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"rows": 3, "rendered": 1, "skipped": 2, "failed": 0}
    assert read_dataset(str(out / "errors")).num_rows == 0
    meta = {m["id"]: m for m in read_dataset(str(out / "metadata")).to_pylist()}
    assert meta["red-ball"]["seed"] == 99 and len(meta) == 3


def test_same_row_same_frames(ray_session, tmp_path):
    rows = [{"id": "a", "prompt": "a green triangle grows", "seed": 3},
            {"id": "b", "prompt": "a green triangle grows", "seed": 3},
            {"id": "c", "prompt": "a green triangle grows", "seed": 4}]
    out = tmp_path / "out"
    assert render(write_manifest(tmp_path / "m.parquet", rows), "--out", out) == 0
    meta = {m["id"]: m for m in read_dataset(str(out / "metadata")).to_pylist()}
    assert meta["a"]["frames_sha256"] == meta["b"]["frames_sha256"] != meta["c"]["frames_sha256"]
    first = meta["a"]["video_sha256"]
    assert render(write_manifest(tmp_path / "m.parquet", rows[:1]), "--out", out, "--no-resume") == 0
    again = {m["id"]: m for m in read_dataset(str(out / "metadata")).to_pylist()}["a"]
    assert (again["video_sha256"], again["frames_sha256"]) == (first, meta["a"]["frames_sha256"])
    assert again["run_id"] != meta["a"]["run_id"]
    assert (again["step_cache"], again["steps_computed"]) == (None, None)

    # the step cache: its threshold enters the request (the clip renders again), the metadata records it
    # and the steps that ran every block; a negative threshold is refused before anything runs
    assert render(write_manifest(tmp_path / "m.parquet", rows[:1]), "--out", out, "--step-cache", "0.5") == 0
    assert json.loads((out / "run.json").read_text())["counts"]["rendered"] == 1
    cached = {m["id"]: m for m in read_dataset(str(out / "metadata")).to_pylist()}["a"]
    assert cached["step_cache"] == 0.5 and 1 <= cached["steps_computed"] < cached["steps"]
    assert cached["request_sha256"] != again["request_sha256"]
    assert render(write_manifest(tmp_path / "m.parquet", rows[:1]), "--out", out, "--step-cache", "-1") == 2


def test_unusable_manifest_exits_2_and_writes_nothing(ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    for manifest in (tmp_path / "missing.parquet", bad, write_manifest(tmp_path / "np.parquet", [{"id": "a"}])):
        assert render(manifest, "--out", out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("reel render: ")
    assert not out.exists()


def test_jsonl_manifest_on_s3(ray_session, bucket):
    lines = "\n".join(json.dumps(r) for r in GOOD[:2] + BAD[1:2]) + "\n"
    storage.write_bytes_atomic(f"s3://{bucket}/campaigns/spring.jsonl", lines.encode())
    out = f"s3://{bucket}/renders/spring"
    assert render(f"s3://{bucket}/campaigns/spring.jsonl", "--out", out) == 3
    assert sorted(storage.list_names(f"{out}/videos")) == ["blue-square.mp4", "red-ball.mp4"]
    meta = read_dataset(f"{out}/metadata").to_pylist()
    assert {m["video_uri"] for m in meta} == {f"{out}/videos/blue-square.mp4", f"{out}/videos/red-ball.mp4"}
    assert probe_mp4(storage.read_bytes(f"{out}/videos/red-ball.mp4"))["codec"] == "h264"
    assert [e["id"] for e in read_dataset(f"{out}/errors").to_pylist()] == [None]
    assert json.loads(storage.read_bytes(f"{out}/run.json"))["counts"]["rendered"] == 2
    assert render(f"s3://{bucket}/campaigns/spring.jsonl", "--out", out) == 3
    assert json.loads(storage.read_bytes(f"{out}/run.json"))["counts"]["skipped"] == 2


def test_an_unknown_recaptioner_is_refused_in_one_line_before_anything_runs(tmp_path, capsys):
    manifest = write_manifest(tmp_path / "m.parquet", GOOD[:1])
    assert render(manifest, "--out", tmp_path / "o", "--recaptioner", "nope") == 2
    err = capsys.readouterr().err.strip()
    assert "unknown recaptioner 'nope'" in err and "llm:PATH_OR_URI" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
