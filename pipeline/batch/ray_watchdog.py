"""The watchdog of a local Ray (`python -m pipeline.batch.ray_watchdog DRIVER_PID`, started by
`local_ray.init_ray`; Linux, it reads /proc).

Ray's dashboard and runtime-env agents notice at once when their raylet dies with the driver, but
then report the death to the GCS, which died too, and wait out that call's hard-coded 60 s timeout
before they exit (ray/_private/utils.py, `publish_error_to_driver`): a SIGKILLed `reel render` or
`reel serve` left them running for over a minute, holding ports and memory.

The watchdog remembers every process under the driver while it lives (a first look before the
driver goes on, then one every 2 s). When the driver's end of its stdin pipe closes (exit, crash,
SIGKILL) it adds the processes whose RAY_RAYLET_PID names a raylet it knew (agents started after
its last look, wherever they were reparented), gives them 3 s to go, then sends SIGTERM and SIGKILL
to those left: only a process with the same start time, never a stranger that reused a pid.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time


def process_stat(pid: int) -> tuple[int, str]:
    """(parent pid, start time) of `pid`, from /proc; OSError once it is gone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), fields[19]


def descendants(root: int, exclude: int | None = None) -> dict[int, str]:
    """{pid: start time} of every process under `root` (`exclude`'s own pid left out)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != exclude:
            try:
                parents[int(name)] = process_stat(int(name))
            except OSError:
                pass
    found, todo = {}, [root]
    while todo:
        top = todo.pop()
        for pid, (ppid, started) in parents.items():
            if ppid == top and pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def _agents_of(raylets: dict[int, str]) -> dict[int, str]:
    """{pid: start time} of the processes whose RAY_RAYLET_PID is one of `raylets`."""
    found = {}
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
            raylet = next((int(e[15:]) for e in env if e.startswith(b"RAY_RAYLET_PID=")), None)
            if raylet in raylets:
                found[int(name)] = process_stat(int(name))[1]
        except (OSError, ValueError):
            pass
    return found


def _alive(known: dict[int, str]) -> list[int]:
    out = []
    for pid, started in known.items():
        try:
            if process_stat(pid)[1] == started:
                out.append(pid)
        except OSError:
            pass
    return out


def main(driver: int) -> None:
    mine = os.getpid()
    known = descendants(driver, exclude=mine)
    print("watching", flush=True)  # the driver waits for this: the tree is known before it can die
    sys.stdout.close()
    while not select.select([sys.stdin], [], [], 2.0)[0]:
        known.update(descendants(driver, exclude=mine))
    known.update({pid: t for pid, t in _agents_of(known).items() if pid not in known})
    deadline = time.monotonic() + 3
    while _alive(known) and time.monotonic() < deadline:
        time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _alive(known):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(1)


if __name__ == "__main__":
    main(int(sys.argv[1]))
