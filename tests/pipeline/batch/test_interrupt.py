"""Stopping a run: Ctrl-C gives one line, exit 130 and a run.json of what finished; a driver killed
with SIGKILL takes its local Ray with it (agents included) within a bound; a local Ray listens on
loopback only. Each test starts its own process with its own local Ray (20-40 s each on 2 cores)."""

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.batch.ray_watchdog import descendants, process_stat
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc (Linux)")

REEL = [sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"]


def environment():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    return {**env, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")}


def alive(processes):
    out = []
    for pid, started in processes.items():
        try:
            if process_stat(pid)[1] == started and open(f"/proc/{pid}/stat").read().split(")")[-1].split()[0] != "Z":
                out.append(pid)
        except OSError:
            pass
    return out


def listening_addresses(pids):
    """The local addresses the TCP sockets of `pids` listen on (from /proc/net/tcp{,6})."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            pass
    found = set()
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] != "0A" or parts[9] not in inodes:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(parts[1].split(":")[0])
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))  # little-endian words
                found.add(str(ipaddress.ip_address(raw)))
    return found


def test_a_sigkilled_driver_takes_its_local_ray_with_it_and_ray_listens_on_loopback(tmp_path):
    script = ("import sys, time\nfrom pipeline.batch.local_ray import init_ray\ninit_ray(None)\n"
              "print('up', flush=True)\ntime.sleep(300)\n")
    driver = subprocess.Popen([sys.executable, "-c", script], env=environment(), stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert driver.stdout.readline().strip() == "up"
        wanted = (("gcs_server",), ("raylet",), ("DashboardAgent", "dashboard/agent.py"),
                  ("RuntimeEnvAgent", "runtime_env/agent"))

        def started():
            cmdlines = []
            for pid in descendants(driver.pid):
                try:
                    cmdlines.append(open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace"))
                except OSError:
                    pass
            return all(any(name in c for name in names for c in cmdlines) for names in wanted)

        wait_for(started, 60, interval=0.2, what="Ray's GCS, raylet and agents started")
        ray_processes = descendants(driver.pid)
        addresses = listening_addresses(ray_processes)
        loopback = [getattr(a, "ipv4_mapped", None) or a for a in map(ipaddress.ip_address, addresses)]
        assert addresses and all(a.is_loopback for a in loopback), addresses
    finally:
        driver.kill()
        driver.wait()
    t0 = time.monotonic()
    try:
        wait_for(lambda: not alive(ray_processes), 30, interval=0.2,
                 what="every process of the killed driver's Ray gone")
    except AssertionError:
        left = {pid: open(f"/proc/{pid}/cmdline", "rb").read()[:120] for pid in alive(ray_processes)}
        raise AssertionError(f"still running 30 s after the driver's SIGKILL: {left}") from None
    print(f"Ray processes gone {time.monotonic() - t0:.1f} s after SIGKILL")


def test_ctrl_c_gives_one_line_exit_130_and_run_json_of_what_finished(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"c{i}", "prompt": "a red ball moves right", "steps": 20,
                                            "width": 128, "height": 128}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    run = subprocess.Popen([*REEL, "render", str(manifest), "--out", str(out), "--model", "tiny", "--no-progress",
                            "--replicas", "1"], env=environment(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any((out / "metadata").glob("*.parquet")), 180, interval=0.2, what="the first clip written")
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("reel render:")]
    assert len(lines) == 1 and "interrupted" in lines[0] and "Traceback" not in err, err
    record = json.loads((out / "run.json").read_text())
    finished = len(list((out / "metadata").glob("*.parquet")))
    assert record["interrupted"] and record["exit_code"] == 130
    # the writer may finish one more clip while the driver stops: run.json counts what was there
    assert 1 <= record["counts"]["rendered"] <= finished < 8, (record["counts"], finished)
