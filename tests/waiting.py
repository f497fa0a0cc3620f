"""`wait_for`: poll a condition until it holds, for tests that wait on a server, a process or a file."""

import time

import httpx2 as httpx


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "timed out") -> None:
    """Return once `predicate()` is true; an HTTP connection error counts as not yet (a server still starting).
    AssertionError "`what`: not within `timeout` s" when it never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout} s")
