"""`reel serve` under steady load, optionally killed and started again mid-run: every accepted job must
complete exactly once, and the resident memory of each process level must stay flat.

    .venv/bin/python bench/serve_soak.py --seconds 600 --clients 6              # a 10-minute soak
    .venv/bin/python bench/serve_soak.py --seconds 120 --clients 6 --kill-at 40  # SIGKILL + restart at 40 s

It starts `reel serve` (the tiny model, its own local Ray, outputs in a local folder unless --out is
given) in a process group of its own; N clients each create a video, poll it until it is done
(honouring 429 + Retry-After), and start the next, until the time is up; then every accepted job is
waited for. With --kill-at the whole group (the `reel serve` process and its Ray) is SIGKILLed at that
second and started again on the same job store: clients see connection errors meanwhile and go on.
Every few seconds it samples the RSS of each process level: the `reel serve` driver, Ray's own
daemons (GCS, raylet, dashboard, agents), the Serve controller, the Serve HTTP proxy, the API ingress
replica, the render replica(s). It prints the figures as JSON: jobs accepted / completed / failed, 429s
(and whether each had Retry-After), 5xx answers, connection errors, and per level the RSS after warm-up
and its slope (MB per minute, least squares over the samples after the first third). tests/pipeline/serve/
test_soak.py runs it briefly; docs/RELIABILITY.md has the figures.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
KEY = "soak-key"
BODY = {"prompt": "a red ball moves right on black", "size": "32x32", "seconds": "1", "steps": 2}
# process levels by the name Ray gives its processes (`ray::<class>` for actors), first match wins
LEVELS = (("render replica", "ServeReplica:reelforge:Renderer"), ("api ingress", "ServeReplica:reelforge:VideoAPI"),
          ("serve proxy", "ProxyActor"), ("serve controller", "ServeController"),
          ("ray daemons", ("gcs_server", "raylet", "dashboard", "DashboardAgent", "RuntimeEnvAgent", "log_monitor",
                           "monitor.py", "dashboard_agent", "runtime_env")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`reel serve` in a process group of its own (its local Ray included), started and killed whole."""

    def __init__(self, out: str, store: str, *, args: tuple[str, ...] = (), env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out, self.store, self.args = out, store, args
        self.env = {**os.environ, **(env or {}), "REEL_API_KEYS": KEY, "RAY_AUTH_MODE": "disabled",
                    "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-soak-", suffix=".log", delete=False)

    def start(self, timeout: float = 240) -> float:
        """Start and wait until /readyz answers 200; the seconds it took."""
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", "--model", "tiny", "--out", self.out, "--store", self.store,
             "--port", str(self.port), "--max-queued", "4", "--max-inflight-per-key", "6", "--max-upload-mb", "1",
             *self.args], env=self.env, cwd=str(ROOT), stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"reel serve exited {self.proc.returncode}:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"reel serve not ready after {timeout} s:\n{self.logs()}")

    def kill(self) -> None:
        """SIGKILL the whole group: the `reel serve` process and every Ray process it started."""
        if self.proc is None:
            return
        members = self.processes()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        psutil.wait_procs(members, timeout=30)

    def stop(self) -> None:
        """SIGTERM (a graceful stop), then SIGKILL for whatever is left of the group."""
        if self.proc is None or self.proc.poll() is not None:
            return self.kill()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def processes(self) -> list[psutil.Process]:
        """The `reel serve` process and its descendants (Ray's daemons and workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_by_level(self) -> dict[str, float]:
        """MB resident per process level (a level of several processes: their sum)."""
        out: dict[str, float] = collections.defaultdict(float)
        for p in self.processes():
            try:
                text = " ".join([p.name(), *p.cmdline()])
                rss = p.memory_info().rss / 2**20
            except psutil.Error:
                continue
            if p.pid == self.proc.pid:
                level = "reel serve driver"
            else:
                level = next((name for name, marks in LEVELS
                              if any(m in text for m in ((marks,) if isinstance(marks, str) else marks))), None)
            if level:
                out[level] += rss
        return dict(out)

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]


class Load:
    """N client threads: create, poll until done, repeat until `stop`; every answer counted."""

    def __init__(self, url: str, clients: int):
        self.url, self.clients = url, clients
        self.accepted: list[str] = []
        self.final: dict[str, str] = {}
        self.statuses: collections.Counter[int] = collections.Counter()
        self.connection_errors = 0
        self.retry_after_missing = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def _request(self, http: httpx.Client, method: str, path: str, **kw) -> httpx.Response | None:
        try:
            r = http.request(method, path, **kw)
        except httpx.TransportError:
            with self._lock:
                self.connection_errors += 1
            time.sleep(0.5)
            return None
        with self._lock:
            self.statuses[r.status_code] += 1
            if r.status_code == 429 and not r.headers.get("Retry-After", "").isdigit():
                self.retry_after_missing += 1
        return r

    def wait_done(self, http: httpx.Client, video_id: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            r = self._request(http, "GET", f"/v1/videos/{video_id}")
            if r is not None and r.status_code == 200 and r.json()["status"] in ("completed", "failed"):
                with self._lock:
                    self.final[video_id] = r.json()["status"]
                return
            time.sleep(0.3)

    def client(self, deadline: float) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
            while not self.stop.is_set():
                r = self._request(http, "POST", "/v1/videos", json=BODY)
                if r is None:
                    continue
                if r.status_code == 429:
                    time.sleep(min(int(r.headers.get("Retry-After", "1") or 1), 5))
                    continue
                if r.status_code != 200:
                    time.sleep(0.5)
                    continue
                video_id = r.json()["id"]
                with self._lock:
                    self.accepted.append(video_id)
                self.wait_done(http, video_id, deadline)

    def run(self, seconds: float, settle: float) -> list[threading.Thread]:
        deadline = time.monotonic() + seconds + settle
        threads = [threading.Thread(target=self.client, args=(deadline,), daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        return threads


def upload_probe(server: ServeProcess, mb: int = 50) -> dict:
    """POST a `mb` MB multipart upload in 1 MB chunks (chunked transfer: no Content-Length to refuse it
    by), stopping as soon as an answer arrives: the answer's status, the MB sent by then (the socket
    buffers on both sides and the Serve proxy's hold several MB before the ingress's answer comes
    back), and the RSS of the API ingress and the Serve proxy before and after."""
    import select

    before = server.rss_by_level()
    boundary = "soakboundary"
    head = (f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n")
    preamble = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na red ball\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"input_reference\"; filename=\"big.png\"\r\n"
                "Content-Type: image/png\r\n\r\n").encode() + b"\x89PNG\r\n\x1a\n"
    chunk = b"\0" * (1 << 20)
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"%x\r\n" % len(preamble) + preamble + b"\r\n")
        try:
            for _ in range(mb):
                if select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += 1
        except OSError:  # the server closed the connection on us: its answer is in the socket already
            pass
        try:
            answer = sock.recv(65536)
        except OSError:
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None
    after = server.rss_by_level()
    return {"status": status, "sent_mb": sent, "of_mb": mb,
            **{f"{level.replace(' ', '_')}_rss_mb_{when}": round(rss.get(level, 0.0), 1)
               for level in ("api ingress", "serve proxy") for when, rss in (("before", before), ("after", after))}}


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) samples, in MB per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mt, mm = sum(t for t, _ in samples) / n, sum(m for _, m in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 60 * sum((t - mt) * (m - mm) for t, m in samples) / var if var else 0.0


def store_consistency(store: str, accepted: list[str]) -> dict:
    """What the job store holds for the accepted ids: statuses, and ids missing or extra."""
    db = sqlite3.connect(store)
    try:
        rows = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    finally:
        db.close()
    return {"statuses": dict(collections.Counter(rows.get(i, "missing") for i in accepted)),
            "extra_jobs": len(set(rows) - set(accepted)), "duplicate_accepts": len(accepted) - len(set(accepted))}


def soak(*, seconds: float, clients: int, out: str, store: str, kill_at: float | None = None,
         sample_every: float = 3.0, settle: float = 120.0, env: dict[str, str] | None = None,
         upload_at: float | None = None) -> dict:
    """Run the load for `seconds` (then wait up to `settle` s for the accepted jobs); the figures.
    `upload_at`: the second at which `upload_probe` sends a 50 MB upload into the load."""
    server = ServeProcess(out, store, env=env)
    figures: dict = {"seconds": seconds, "clients": clients, "start_seconds": round(server.start(), 1)}
    load = Load(server.url, clients)
    samples: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    t0 = time.monotonic()
    threads = load.run(seconds, settle)
    killed = False
    try:
        while time.monotonic() - t0 < seconds:
            now = time.monotonic() - t0
            if kill_at is not None and not killed and now >= kill_at:
                server.kill()
                figures["restart_seconds"] = round(server.start(), 1)
                killed = True
                samples.clear()  # memory is measured on the last process generation
                continue
            if upload_at is not None and "upload" not in figures and now >= upload_at:
                figures["upload"] = upload_probe(server)
            for level, mb in server.rss_by_level().items():
                samples[level].append((now, mb))
            time.sleep(sample_every)
        load.stop.set()
        for t in threads:
            t.join(timeout=settle + 30)
        figures["rss_mb"] = {}
        for level, series in sorted(samples.items()):
            warm = series[len(series) // 3:]
            figures["rss_mb"][level] = {"after_warmup": round(warm[0][1], 1) if warm else None,
                                        "last": round(series[-1][1], 1),
                                        "slope_mb_per_min": round(slope_mb_per_min(warm), 2)}
    finally:
        server.stop()
    figures.update({
        "accepted": len(load.accepted), "completed": sum(s == "completed" for s in load.final.values()),
        "failed": sum(s == "failed" for s in load.final.values()),
        "unfinished": len(set(load.accepted) - set(load.final)),
        "answers": {str(k): v for k, v in sorted(load.statuses.items())},
        "server_errors_5xx": sum(v for k, v in load.statuses.items() if k >= 500),
        "connection_errors": load.connection_errors, "429_without_retry_after": load.retry_after_missing,
        "killed_and_restarted": killed, "store": store_consistency(store, load.accepted),
    })
    figures["accepted_ids"] = load.accepted
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--clients", type=int, default=6)
    p.add_argument("--kill-at", type=float, help="SIGKILL the endpoint at this second and start it again")
    p.add_argument("--upload-at", type=float, help="send a 50 MB upload at this second")
    p.add_argument("--out", help="output folder or URI (default: a temporary folder)")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="serve-soak-")
    figures = soak(seconds=a.seconds, clients=a.clients, out=a.out or os.path.join(work, "out"),
                   store=os.path.join(work, "jobs.sqlite"), kill_at=a.kill_at, upload_at=a.upload_at)
    figures.pop("accepted_ids")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
