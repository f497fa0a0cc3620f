"""A real two-node Ray cluster on this machine, the render job submitted with the Ray Jobs SDK.

The cluster is its own: `ray start --head --block` and `ray start --address … --block` run as
child processes in a process group of their own, with a private --temp-dir and free ports, so
it neither sees nor disturbs a Ray started by other tests (ray.init in `ray_session`) or anyone
else on the machine. It is stopped by signalling that process group — never `ray stop`, which
stops every Ray on the machine. Outputs go to the loopback S3 server, shared by both nodes.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline import storage

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(150)]

ROOT = Path(__file__).resolve().parents[3]
RAY = str(Path(sys.executable).with_name("ray"))
ROWS = [
    {"id": "c-red", "prompt": "a red ball moves right on black", "seconds": 0.5, "steps": 2},
    {"id": "c-blue", "prompt": "a blue square drifts left", "seconds": 0.5, "steps": 2},
]


def _free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_port(host, port, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


class Cluster:
    """Head (`cpus` CPUs, dashboard + Jobs API) and one worker node (`cpus` CPUs, resource `encode`)."""

    def __init__(self, env, cpus: int = 1):
        self.env, self.cpus = env, cpus
        self.temp_dir = tempfile.mkdtemp(prefix="rfc-", dir="/tmp")  # short: Unix socket paths max ~107 chars
        self.procs: list[subprocess.Popen] = []
        self.ip = "127.0.0.1"

    def _start(self, args, name):
        log = open(Path(self.temp_dir) / f"{name}.out", "w")
        proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir)
        self.procs.append(proc)
        return proc

    @staticmethod
    def _node_ports():
        p = _free_ports(7)
        return ["--node-manager-port", p[0], "--object-manager-port", p[1], "--metrics-export-port", p[2],
                "--dashboard-agent-listen-port", p[3], "--dashboard-agent-grpc-port", p[4],
                "--runtime-env-agent-port", p[5], "--min-worker-port", 0, "--max-worker-port", 0]

    def start(self):
        gcs, dashboard, client = _free_ports(3)
        self.address = f"{self.ip}:{gcs}"
        self.dashboard = f"http://{self.ip}:{dashboard}"
        head = self._start(list(map(str, [
            "--head", "--node-ip-address", self.ip, "--port", gcs, "--num-cpus", self.cpus, "--num-gpus", 0,
            "--include-dashboard", "true", "--dashboard-host", self.ip, "--dashboard-port", dashboard,
            "--ray-client-server-port", client, "--temp-dir", self.temp_dir,
            "--object-store-memory", 256 << 20, *self._node_ports()])), "head")
        _wait_port(self.ip, dashboard, head, 60)
        self._start(list(map(str, [
            "--address", self.address, "--node-ip-address", self.ip, "--num-cpus", self.cpus, "--num-gpus", 0,
            "--resources", json.dumps({"encode": 1}), "--object-store-memory", 256 << 20,
            *self._node_ports()])), "worker")

    def stop(self):
        for proc in reversed(self.procs):  # worker, then head: SIGTERM, then SIGKILL after 5 s
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the rest of the group (raylet, GCS, dashboard, workers) goes with it
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def logs(self):
        return "\n".join(p.read_text()[-2000:] for p in Path(self.temp_dir).glob("*.out"))


@pytest.fixture
def cluster(s3_server):
    # Ray processes inherit the AWS_* settings of the loopback S3 (set by s3_server), and find
    # `python` and the project in this venv.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    c = Cluster(env)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_render_job_on_two_node_cluster(cluster, bucket, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    manifest, out = f"s3://{bucket}/manifests/small.jsonl", f"s3://{bucket}/renders/small"
    storage.write_bytes_atomic(manifest, "".join(json.dumps(r) + "\n" for r in ROWS).encode())

    client = JobSubmissionClient(cluster.dashboard)
    deadline = time.monotonic() + 30
    while len([n for n in _nodes(cluster) if n]) < 2:
        assert time.monotonic() < deadline, f"worker node never joined\n{cluster.logs()}"
        time.sleep(0.5)

    job = client.submit_job(
        entrypoint=f"python -m jobs.render_manifest {manifest} --out {out} --model tiny "
                   f"--cpus-per-replica 0.5 --no-progress",
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    deadline = time.monotonic() + 100
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job still {status}\n{client.get_job_logs(job)[-3000:]}"
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "rendered 2, skipped 0, failed 0" in logs

    run = json.loads(storage.read_bytes(storage.join(out, "run.json")))
    assert run["counts"] == {"rows": 2, "rendered": 2, "skipped": 0, "failed": 0} and run["exit_code"] == 0
    assert storage.list_names(storage.join(out, "videos")) == ["c-blue.mp4", "c-red.mp4"]
    assert storage.list_names(storage.join(out, "metadata")) == ["c-blue.parquet", "c-red.parquet"]


def _nodes(cluster):
    """Alive nodes as the head's dashboard reports them (no ray.init in this process)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{cluster.dashboard}/nodes?view=summary", timeout=5) as r:
            data = json.load(r)
    except OSError:
        return []
    return [n for n in data.get("data", {}).get("summary", []) if n.get("raylet", {}).get("state") == "ALIVE"]
