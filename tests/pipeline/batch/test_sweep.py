"""The nightly sweep on a real local Ray with the tiny model: only manifests without a complete
run.json render; a rerun renders nothing."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.batch.driver import RenderConfig, render_manifest
from pipeline.batch.sweep import find_manifests, main, run_is_complete

ROW = {"prompt": "a red ball moves right on black", "seconds": 0.5, "steps": 2}


def test_sweep_renders_only_incomplete_manifests_and_is_idempotent(ray_session, tmp_path, capsys):
    manifests, out = tmp_path / "manifests", tmp_path / "renders"
    manifests.mkdir()
    pq.write_table(pa.Table.from_pylist([{"id": "done-1", **ROW}]), manifests / "done.parquet")
    (manifests / "todo.jsonl").write_text(json.dumps({"id": "todo-1", **ROW}) + "\n")
    (manifests / "notes.txt").write_text("not a manifest")
    assert [n for n, _ in find_manifests(str(manifests))] == ["done", "todo"]

    # "done" already rendered completely by an earlier run.
    first = render_manifest(RenderConfig(manifest=str(manifests / "done.parquet"), out=str(out / "done"),
                                         model="tiny", progress=False))
    assert first.rendered == 1 and run_is_complete(str(out / "done"))
    done_run = (out / "done" / "run.json").read_bytes()

    argv = [str(manifests), "--out", str(out), "--model", "tiny", "--cpus-per-replica", "0.5"]
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "1 rendered, 1 already complete" in err.splitlines()[-1]
    assert (out / "done" / "run.json").read_bytes() == done_run  # untouched
    assert run_is_complete(str(out / "todo")) and (out / "todo" / "videos" / "todo-1.mp4").exists()
    summaries = storage.list_names(str(out / "_sweeps"))
    assert len(summaries) == 1
    summary = json.loads((out / "_sweeps" / summaries[0]).read_text())
    assert {m["name"]: m["status"] for m in summary["manifests"]} == {"done": "complete", "todo": "rendered"}

    # A rerun renders nothing; a run that recorded failed rows counts as incomplete.
    assert main(argv) == 0
    assert "0 rendered, 2 already complete" in capsys.readouterr().err.splitlines()[-1]
    run = json.loads((out / "todo" / "run.json").read_text())
    run["counts"]["failed"], run["exit_code"] = 1, 3
    (out / "todo" / "run.json").write_text(json.dumps(run))
    assert not run_is_complete(str(out / "todo"))
    assert main(argv) == 0
    last = capsys.readouterr().err.splitlines()[-1]
    assert "1 rendered, 1 already complete" in last and "0 rendered, 1 skipped" in last  # resumed: the clip was there
