"""Local copies of model folders: a local path is used where it is; a folder at any other fsspec
URI (s3://, gs://, …) is copied once per machine into the cache (`REELFORGE_CACHE`, default
~/.cache/reelforge) and reused by every process there.

    local_model_dir("s3://bucket/Wan2.1-T2V-1.3B-Diffusers")   # → ~/.cache/reelforge/models/<uri>/<content>
    local_model_file("s3://bucket/loras/style.safetensors")     # → ~/.cache/reelforge/files/<uri>/<version>/style…

A single file (a LoRA adapter) is cached the same way, keyed by its URI and its size and version
(`file_version`), under `files/`.

The cache is keyed by the URI and by the folder's content as its listing gives it (each file's
path, size and ETag / generation / modification time), so a folder replaced at the same URI is
fetched again, and a process that finds the listing it knows uses its copy without a download.
Processes on one machine (the actors of a node) share a copy: the first takes a lock file and
copies, the others wait for the lock and find the copy made. A copy is made in a temporary folder,
checked against the listing's sizes, marked complete, then renamed into place: a half-copied folder
(a process killed mid-copy, a dropped connection) is never used. Older copies of the same URI are
removed once a newer one is in place (a folder replaced mid-run costs the processes still loading
the old copy their load; the cache keeps one copy per URI).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.store import store_fs

CACHE_DIR = Path(os.environ.get("REELFORGE_CACHE", Path.home() / ".cache" / "reelforge"))
#: the file inside a copy that says it is complete: the listing it was copied from
COMPLETE = ".complete"
#: the fields of a listing entry that change when an object is replaced, by filesystem: S3's ETag,
#: GCS's generation and md5, a modification time, a creation time (fsspec's memory filesystem)
VERSION_FIELDS = ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "last_modified", "updated",
                  "created")

log = logging.getLogger(__name__)


def local_model_dir(uri: str, what: str = "model") -> str:
    """A local folder holding the model at `uri` (a local path, or a cached copy of a remote
    folder). Raises FileNotFoundError ("{what} folder not found: {uri}") when there is none."""
    fs, path = store_fs(uri)
    if _is_local(fs):
        if not fs.isdir(path):
            raise FileNotFoundError(f"{what} folder not found: {uri}")
        return path
    listing = folder_listing(fs, path)
    if not listing:
        raise FileNotFoundError(f"{what} folder not found: {uri}")
    home = CACHE_DIR / "models" / _sha256(uri.rstrip("/"))[:16]
    target = home / _sha256(json.dumps(listing, sort_keys=True))[:16]
    if (target / COMPLETE).is_file():
        return str(target)
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / ".lock"):
        if not (target / COMPLETE).is_file():  # not made while this process waited for the lock
            _copy(fs, path, listing, target, uri)
        for old in home.iterdir():  # the copies of earlier versions at this URI
            if old.is_dir() and old != target:
                shutil.rmtree(old, ignore_errors=True)
    return str(target)


def local_model_file(uri: str, what: str = "file") -> str:
    """A local path holding the file at `uri` (a local path as it is, or a cached copy of a remote
    file, made as `local_model_dir` makes folders). FileNotFoundError ("{what} not found: {uri}")."""
    fs, path = store_fs(uri)
    version = _file_entry(fs, path)
    if version is None:
        raise FileNotFoundError(f"{what} not found: {uri}")
    if _is_local(fs):
        return path
    name = path.rstrip("/").rsplit("/", 1)[-1]
    home = CACHE_DIR / "files" / _sha256(uri)[:16]
    target = home / _sha256(json.dumps(version))[:16]
    if (target / COMPLETE).is_file():
        return str(target / name)
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / ".lock"):
        if not (target / COMPLETE).is_file():
            parent, _, _ = path.rstrip("/").rpartition("/")
            _copy(fs, parent, {name: version}, target, uri)
        for old in home.iterdir():
            if old.is_dir() and old != target:
                shutil.rmtree(old, ignore_errors=True)
    return str(target / name)


def file_version(uri: str) -> list | None:
    """[size, version] of the file at `uri` (version: its ETag, generation or modification time, as
    `folder_listing` takes them): what changes when the file is replaced; None when there is no file."""
    fs, path = store_fs(uri)
    return _file_entry(fs, path)


def _file_entry(fs, path: str) -> list | None:
    try:
        entry = fs.info(path)
    except (FileNotFoundError, OSError):
        return None
    if entry.get("type", "file") != "file":
        return None
    version = next((entry[k] for k in VERSION_FIELDS if entry.get(k) is not None), None)
    return [int(entry.get("size") or 0), None if version is None else str(version)]


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def folder_listing(fs, path: str) -> dict[str, list]:
    """{relative path: [size, version]} of every file under `path` (empty: no such folder)."""
    root = path.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    listing = {}
    for name, entry in found.items():
        if entry.get("type", "file") != "file" or not name.startswith(root + "/"):
            continue
        version = next((entry[k] for k in VERSION_FIELDS if entry.get(k) is not None), None)
        listing[name[len(root) + 1:]] = [int(entry.get("size") or 0), None if version is None else str(version)]
    return listing


def _copy(fs, path: str, listing: dict[str, list], target: Path, uri: str) -> None:
    """Copy the listed files into a fresh temporary folder beside `target`, check their sizes, mark
    the copy complete, then rename it to `target` (whatever was at `target` without a marker goes)."""
    log.info("copying %s (%d files, %d bytes) to %s", uri, len(listing), sum(s for s, _ in listing.values()), target)
    tmp = target.parent / f".tmp-{uuid.uuid4().hex[:12]}"
    try:
        names = sorted(listing)
        for rel in names:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        root = path.rstrip("/")
        fs.get([f"{root}/{rel}" for rel in names], [str(tmp / rel) for rel in names])
        for rel in names:
            size = os.path.getsize(tmp / rel)
            if size != listing[rel][0]:
                raise OSError(f"{uri}/{rel}: copied {size} bytes of {listing[rel][0]}; the copy was cut short, "
                              f"try again")
        (tmp / COMPLETE).write_text(json.dumps(listing, sort_keys=True))
        shutil.rmtree(target, ignore_errors=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock on `lock_file` among this machine's processes (released when the holder
    exits, however it exits)."""
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
