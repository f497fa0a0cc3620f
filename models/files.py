"""Local copies of model folders: a local path is used where it is; a folder at any other fsspec
URI (s3://, gs://, …) is copied once per machine into the cache (`REELFORGE_CACHE`, default
~/.cache/reelforge) and reused by every process there. A copy is used only once it is complete."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import fsspec

CACHE_DIR = Path(os.environ.get("REELFORGE_CACHE", Path.home() / ".cache" / "reelforge"))


def local_model_dir(uri: str, what: str = "model") -> str:
    """A local folder holding the model at `uri` (a local path, or a cached copy of a remote
    folder). Raises FileNotFoundError ("{what} folder not found: {uri}") when there is none."""
    fs, path = fsspec.core.url_to_fs(uri)
    if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        if not fs.isdir(path):
            raise FileNotFoundError(f"{what} folder not found: {uri}")
        return path
    target = CACHE_DIR / "models" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = target / ".complete"
    if not done.exists():
        if not fs.isdir(path):
            raise FileNotFoundError(f"{what} folder not found: {uri}")
        target.mkdir(parents=True, exist_ok=True)
        fs.get(path.rstrip("/") + "/", str(target), recursive=True)
        done.touch()
    return str(target)
