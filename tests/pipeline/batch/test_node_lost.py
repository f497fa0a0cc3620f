"""A node lost mid-run: a real two-node Ray cluster on this machine (tests/pipeline/batch/test_cluster_job.py's
`ray start` head + worker, 2 CPUs each), `reel render --address` to it, and the worker node's raylet killed
with SIGKILL once the first clip is complete and the worker holds pipeline actors. Ray Data restarts the lost
actors on the head and retries their clips: the run completes, each row exactly once. Outputs go to the
loopback S3 through tests/flaky_store.py with no faults drawn, so every PUT is counted: each clip's metadata
(written last, the mark of a complete clip) is PUT exactly once, and every video is whole.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline import storage
from tests.exactly_once import check_outputs
from tests.flaky_store import FlakyStore
from tests.pipeline.batch.test_cluster_job import Cluster, _nodes

pytestmark = [pytest.mark.cluster, pytest.mark.faults, pytest.mark.timeout(400)]

ROOT = Path(__file__).resolve().parents[3]
ROWS = [{"id": f"n{i}", "prompt": "a red ball moves right on black", "seed": i, "width": 32, "height": 32,
         "seconds": 1, "steps": 4} for i in range(8)]


def ray_processes(root: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(root.pid).children(recursive=True) if p.is_running()]
    except psutil.NoSuchProcess:
        return []


def test_the_worker_node_lost_mid_run_every_row_rendered_exactly_once(s3_server, bucket):
    store = FlakyStore(s3_server, rate=0.0).start()
    env = {**os.environ, "AWS_ENDPOINT_URL": store.url, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cluster = Cluster(env, cpus=2)
    manifest, out = f"s3://{bucket}/m/nodes.jsonl", f"s3://{bucket}/renders/nodes"
    storage.write_bytes_atomic(manifest, "".join(json.dumps(r) + "\n" for r in ROWS).encode())
    run = None
    try:
        cluster.start()
        deadline = time.monotonic() + 60
        while len(_nodes(cluster)) < 2:
            assert time.monotonic() < deadline, f"worker node never joined\n{cluster.logs()}"
            time.sleep(0.5)
        t0 = time.perf_counter()
        run = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "render", manifest, "--out", out, "--model",
                                "default", "--address", cluster.address, "--no-progress"], env=env, cwd=str(ROOT),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        worker = cluster.procs[1]
        killed = None
        deadline = time.monotonic() + 240
        while killed is None and run.poll() is None and time.monotonic() < deadline:
            done = storage.list_names(storage.join(out, "metadata"))
            actors = [p for p in ray_processes(worker) if p.name().startswith("ray::MapWorker")]
            if done and actors:
                raylet = next(p for p in ray_processes(worker) if p.name() == "raylet")
                raylet.send_signal(signal.SIGKILL)
                killed = (len(done), len(actors))
            time.sleep(0.2)
        output, _ = run.communicate(timeout=300)
        seconds = time.perf_counter() - t0
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        cluster.stop()
        store.stop()
    assert killed, f"the worker node never ran a pipeline actor before the run ended\n{output[-3000:]}"
    print(f"\nworker raylet killed after {killed[0]} clip(s), holding {killed[1]} pipeline actor(s); "
          f"run {seconds:.1f} s")
    assert run.returncode == 0, output[-3000:]
    summary = json.loads(storage.read_bytes(storage.join(out, "run.json")))
    assert summary["counts"] == {"rows": 8, "rendered": 8, "skipped": 0, "failed": 0}
    meta = check_outputs(out, [r["id"] for r in ROWS])
    assert {m["run_id"] for m in meta} == {summary["run_id"]}
    metadata_puts = {k: n for k, n in store.puts.items() if "/renders/nodes/metadata/" in k}
    assert len(metadata_puts) == 8 and set(metadata_puts.values()) == {1}, metadata_puts  # each clip once
