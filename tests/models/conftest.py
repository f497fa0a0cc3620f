"""Shared fixtures for the models tests: small configs, one text encoder, one tiny generator.

Everything runs offline on the CPU; the tiny config keeps each render well under a second.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.config import load_config  # noqa: E402


@pytest.fixture(autouse=True)
def _two_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_config():
    return load_config("tiny")


@pytest.fixture(scope="session")
def text_encoder(tiny_config):
    from models.text import TextEncoder

    return TextEncoder(tiny_config.text)


@pytest.fixture(scope="session")
def tiny_generator():
    from models.interface import load_generator

    return load_generator("tiny", device="cpu")


@pytest.fixture(scope="session")
def run_ranks():
    """`run(script, world, out_dir, *args, env={}, timeout=s)`: `world` processes of `script` (a test
    file that is also a rank's main: `script RANK WORLD PORT OUT_DIR *args`) on one free port, each
    given OMP_NUM_THREADS=1, DeepSpeed's CPU accelerator and the repository on PYTHONPATH; waits for
    all, fails with the ranks' output if any failed, and returns OUT_DIR/results.json (rank 0's)."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def run(script, world: int, out_dir: Path, *args: str, env: dict | None = None, timeout: float = 300):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        environ = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(root),
                   **(env or {})}
        procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(port), str(out_dir), *args],
                                  cwd=root, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        logs = []
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=timeout)
                logs.append(out)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
        if any(proc.returncode for proc in procs):
            raise AssertionError("a rank failed:\n" + "\n".join(log[-3000:] for log in logs))
        return json.loads((Path(out_dir) / "results.json").read_text())

    return run
