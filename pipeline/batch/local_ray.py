"""The Ray a run joins or starts: a cluster address checked before Ray retries it for minutes, or a
local Ray on loopback only, watched so that it ends with the process that started it
(`pipeline/batch/ray_watchdog.py`). Used by `reel render` and `reel serve`."""

from __future__ import annotations

import logging
import os
import socket
import sys

from pipeline.errors import UsageError, one_line


def init_ray(address: str | None) -> None:
    """Join the Ray cluster at `address` (or RAY_ADDRESS), or start a local Ray for this process.

    A cluster address that does not answer is a UsageError at once (Ray itself retries the GCS
    for minutes). A local Ray listens on loopback only (`local_ray_on_loopback`) and is watched
    (`_watch_local_ray`): when this process dies, even by SIGKILL, its Ray processes go too.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    local_ray_on_loopback(address)
    if address:
        _check_ray_address(address)
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, TimeoutError, RuntimeError) as e:
            raise UsageError(f"cannot join the Ray cluster at {address}: {one_line(e, 300)}") from None
    else:
        # A local Ray for this run: no dashboard, an object store sized for clips not datasets.
        # address="local": a new one even when `ray start` left a cluster on this machine (plain
        # ray.init() would join that one, and refuse the object store size).
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ray.init(address="local", include_dashboard=False, object_store_memory=min(2 << 30, int(total * 0.3)),
                 logging_level=logging.WARNING, log_to_driver=False)
        _watch_local_ray()


def local_ray_on_loopback(address: str | None) -> None:
    """For a local run (no cluster address), have the Ray started here take 127.0.0.1 as its node
    address, so its GCS, raylet, object manager, workers and agents listen on loopback only
    instead of every interface. Ray chooses the node address when `ray` is imported
    (`ray_constants.ENABLE_RAY_CLUSTER`, read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER: off, the
    node is 127.0.0.1, as Ray does on macOS; `ray.init(_node_ip_address="127.0.0.1")` is turned
    back into the routable address), so call this before the first `import ray`; after it, no-op.
    """
    if not address and "ray" not in sys.modules:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def _check_ray_address(address: str) -> None:
    """A HOST:PORT cluster address must accept a TCP connection within 5 s (`auto` and `ray://`
    are Ray's to resolve): Ray would otherwise retry an address with nothing behind it for minutes."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UsageError(f"cannot reach the Ray cluster at {address} ({one_line(e, 200)}); start it with "
                         "`ray start --head`, or leave --address out for a local Ray") from None


def _watch_local_ray() -> None:
    """Start the watchdog of this process's local Ray (Linux; `pipeline/batch/ray_watchdog.py` says
    why Ray's agents outlive a killed driver). It ends them when this process ends, however."""
    import subprocess

    if not os.path.isdir("/proc/self"):
        return
    import select

    read_end, write_end = os.pipe()
    watchdog = subprocess.Popen([sys.executable, "-m", "pipeline.batch.ray_watchdog", str(os.getpid())],
                                stdin=read_end, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    os.close(read_end)
    _WATCHDOG_PIPE.append(write_end)  # held open for the life of this process; its close is the signal
    if select.select([watchdog.stdout], [], [], 30)[0]:  # its first look at the Ray processes is done
        watchdog.stdout.readline()
    watchdog.stdout.close()


_WATCHDOG_PIPE: list[int] = []
