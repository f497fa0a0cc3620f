"""The identity of a folder's weights: one sha256 over the sha256s of its weight files.

    weights_digest(folder.path, folder.weight_files)   # hex sha256

The digest is the sha256 of the lines `<relative path> <sha256 of the file>\\n`, sorted by path:
two folders with the same weights in the same files have the same digest, wherever they lie.
A file's sha256 is computed once and kept in a cache (`REELFORGE_CACHE`/file-sha256.json) under its
real path, size and modification time, so a 30 GB checkpoint is read through once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid

from models.files import CACHE_DIR

CACHE_FILE = CACHE_DIR / "file-sha256.json"
CHUNK = 16 << 20


def weights_digest(root: str, files: tuple[str, ...] | list[str]) -> str:
    """sha256 over `files` (paths relative to `root`, '/'-separated) and their sha256s."""
    digests = cached_file_sha256s([os.path.join(root, rel) for rel in files])
    lines = [f"{rel} {digests[os.path.join(root, rel)]}\n" for rel in sorted(files)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def cached_file_sha256s(paths: list[str]) -> dict[str, str]:
    """{path: sha256 of the file}, each read once per machine (the cache keeps it under the file's
    real path, size and modification time); a LoRA adapter's digest comes from here too."""
    cache = _read_cache()
    out, changed = {}, False
    for given in paths:
        path = os.path.realpath(given)
        st = os.stat(path)
        key = [st.st_size, st.st_mtime_ns]
        entry = cache.get(path)
        if not (isinstance(entry, dict) and entry.get("key") == key):
            entry, changed = {"key": key, "sha256": file_sha256(path)}, True
            cache[path] = entry
        out[given] = entry["sha256"]
    if changed:
        _write_cache(cache)
    return out


def file_sha256(path: str) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_cache() -> dict:
    try:
        with open(CACHE_FILE, encoding="utf-8") as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    """Replace the cache file atomically; a cache that cannot be written only costs a re-read later."""
    cache = {k: v for k, v in cache.items() if os.path.exists(k)}  # files gone since: forget them
    try:
        CACHE_FILE.parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{CACHE_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(tmp, CACHE_FILE)
    except OSError:
        pass
