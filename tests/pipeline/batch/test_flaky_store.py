"""`reel render` against a flaky object store: the loopback S3 server behind tests/flaky_store.py, which
answers 20 % of requests with 503 SlowDown, 500, a connection reset (before or after forwarding) or a 1 s
stall. Each run is `reel render` in a process of its own (with its own local Ray), so that it and its
Ray workers reach S3 only through the proxy, as a user's shell with AWS_ENDPOINT_URL would.

* 20 rows to s3:// through the faults: every row rendered once, 0 failed, every video whole (its
  sha256 the one its metadata records), retries in botocore's standard mode doing the work.
* The store down for good mid-run: the rows not yet written fail with a one-line reason, the run
  exits 3 with the reasons on stderr (errors/ cannot be written), and a rerun once the store is
  back renders exactly the missing rows.
* A model folder copied from the flaky store (models/files.py) is byte for byte the folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import storage
from tests.exactly_once import check_outputs
from tests.flaky_store import FlakyStore

ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.faults

MODEL = "default"
PROMPTS = ["a red ball moves right on black", "a blue square drifts left", "a white circle falls",
           "a green square moves up"]


def rows(n: int) -> list[dict]:
    return [{"id": f"r{i:02d}", "prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "width": 32, "height": 32,
             "seconds": 0.5, "steps": 2} for i in range(n)]


@pytest.fixture
def flaky(s3_server):
    store = FlakyStore(s3_server, rate=0.2, seed=23).start()
    try:
        yield store
    finally:
        store.stop()


def reel(*args: str, endpoint: str, timeout: float = 400, **env: str) -> subprocess.CompletedProcess:
    """`reel ...` in a fresh process whose S3 endpoint is `endpoint` (its Ray workers inherit it)."""
    environ = {**os.environ, "AWS_ENDPOINT_URL": endpoint, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled",
               **env}
    environ.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=environ, capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT))


def write_manifest(uri: str, manifest_rows: list[dict]) -> str:
    storage.write_bytes_atomic(uri, "".join(json.dumps(r) + "\n" for r in manifest_rows).encode())
    return uri


def test_twenty_rows_through_a_flaky_store_render_once_each(flaky, bucket):
    manifest, out = f"s3://{bucket}/m/twenty.jsonl", f"s3://{bucket}/renders/twenty"
    write_manifest(manifest, rows(20))
    t0 = time.perf_counter()
    done = reel("render", manifest, "--out", out, "--model", MODEL, "--no-progress", endpoint=flaky.url)
    seconds = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    faults = {k: v for k, v in flaky.counts.items() if k not in ("requests", "forwarded")}
    print(f"\n20 rows through the flaky store: {seconds:.1f} s, {flaky.counts['requests']} requests, faults {faults}")
    assert sum(faults.values()) >= 0.1 * flaky.counts["requests"] and len(faults) == 5  # every kind happened

    run = json.loads(storage.read_bytes(storage.join(out, "run.json")))
    assert run["counts"] == {"rows": 20, "rendered": 20, "skipped": 0, "failed": 0} and run["exit_code"] == 0
    meta = check_outputs(out, [r["id"] for r in rows(20)])
    assert {m["run_id"] for m in meta} == {run["run_id"]}  # each clip rendered in this run, once
    assert storage.read_parquet_dataset(storage.join(out, "errors")).num_rows == 0


def test_the_store_lost_mid_run_fails_the_rest_in_one_line_and_a_rerun_completes_them(flaky, bucket):
    manifest, out = f"s3://{bucket}/m/six.jsonl", f"s3://{bucket}/renders/six"
    ids = [r["id"] for r in rows(6)]
    write_manifest(manifest, rows(6))
    flaky.rate = 0.0  # only the outage here
    flaky.down_after("/metadata/", 2)  # gone for good once two clips are complete
    # fewer attempts than the default 6, so that each request to the dead store gives up in seconds
    first = reel("render", manifest, "--out", out, "--model", MODEL, "--no-progress", endpoint=flaky.url,
                 AWS_MAX_ATTEMPTS="3")
    assert first.returncode == 3, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    assert "cannot write errors/ and run.json" in first.stderr
    failed_lines = [ln for ln in first.stderr.splitlines() if ln.startswith("  row ")]
    assert 1 <= len(failed_lines) <= 4 and all("write" in ln for ln in failed_lines), first.stderr[-3000:]

    flaky.up()
    complete = storage.list_names(storage.join(out, "metadata"))
    assert 2 <= len(complete) <= 5 and len(complete) + len(failed_lines) == 6
    second = reel("render", manifest, "--out", out, "--model", MODEL, "--no-progress", endpoint=flaky.url)
    assert second.returncode == 0, second.stderr[-3000:]
    run = json.loads(storage.read_bytes(storage.join(out, "run.json")))
    assert run["counts"] == {"rows": 6, "rendered": 6 - len(complete), "skipped": len(complete), "failed": 0}
    meta = check_outputs(out, ids)
    by_run = {m["id"]: m["run_id"] for m in meta}
    assert sorted(i for i, r in by_run.items() if r == run["run_id"]) == sorted(set(ids) - {
        name.removesuffix(".parquet") for name in complete})


def test_a_model_folder_read_through_a_flaky_store_is_the_folder(flaky, bucket, tmp_path):
    from tests.conftest import build_wan_folder

    folder = tmp_path / "Tiny-Wan"
    build_wan_folder(folder, "wan21")
    fs, _ = storage.resolve(f"s3://{bucket}")
    fs.put(str(folder), f"{bucket}/models/Tiny-Wan", recursive=True)  # straight to the S3 server
    uri = f"s3://{bucket}/models/Tiny-Wan"
    code = ("import sys; from models.interface import local_model_dir; "
            "print(local_model_dir(sys.argv[1]))")
    environ = {**os.environ, "AWS_ENDPOINT_URL": flaky.url, "PYTHONPATH": str(ROOT),
               "REELFORGE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code, uri], env=environ, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    copy = Path(done.stdout.strip().splitlines()[-1])
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files and sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file() and p.name != ".complete") \
        == files
    for rel in files:
        assert (copy / rel).read_bytes() == (folder / rel).read_bytes(), rel
    faults = sum(v for k, v in flaky.counts.items() if k not in ("requests", "forwarded"))
    assert faults >= 2, flaky.counts


@pytest.mark.parametrize("resume", [True, False])
def test_an_unreachable_output_is_exit_2_in_one_line(s3_server, bucket, tmp_path, monkeypatch, capsys, resume):
    from bench.serve_soak import free_port
    from pipeline.cli import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(rows(1)[0]) + "\n")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    t0 = time.perf_counter()
    code = main(["render", str(manifest), "--out", f"s3://{bucket}/renders", "--model", MODEL, "--no-progress",
                 *([] if resume else ["--no-resume"])])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"reel render: cannot read --out s3://{bucket}/renders: EndpointConnectionError: ")
    assert time.perf_counter() - t0 < 30  # 2 attempts, not the usual backoff
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    code = main(["render", str(manifest), "--out", "s3://no-such-bucket-here/renders", "--model", MODEL])
    err = capsys.readouterr().err
    assert code == 2 and "no bucket 'no-such-bucket-here'" in err and len(err.strip().splitlines()) == 1, err
