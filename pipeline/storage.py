"""Object storage: one small API over local paths, file://, s3://, gs:// and memory:// URIs.

Every output key is written atomically: a reader never sees a half-written object at its final key.

* Local files are written to a hidden temp name in the same folder, fsync'ed, then `os.replace`d
  (a rename within one filesystem is atomic on POSIX).
* Object stores (S3, GCS, Azure, memory) get the whole object in a single PUT (`fs.pipe`). An object
  appears only when its upload completes, and s3fs falls back to a multipart upload only for objects
  over 100 MiB, which is atomic too (the object appears on CompleteMultipartUpload). Data is never
  streamed through `fs.open("wb")`: fsspec commits a file on `__exit__` even when the block raised.
* Any other fsspec filesystem: temp key in the same folder, then `fs.mv`.

S3-compatible stores are reached with the standard AWS settings and no code change:
`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` (or `endpoint_url` in the profile's config), credentials
from the environment, the profile or the instance role. botocore (>= 1.31) reads these itself and
aiobotocore, under s3fs, shares its configuration, so no endpoint is passed here (checked against
a loopback S3 with s3fs 2026.9 / aiobotocore 3.10 / botocore 1.43). GCS emulators are reached with
`STORAGE_EMULATOR_HOST`, which gcsfs reads itself.

Temp names start with "." so listings here (`list_names`) and Parquet dataset readers (pyarrow
ignores "." and "_" prefixes) never see them; ids cannot start with "." (see `validate_key`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import threading
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.core import split_protocol

from models.interface import store_options

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs

__all__ = [
    "KEY_PATTERN", "validate_key", "resolve", "join", "write_bytes_atomic", "write_json_atomic",
    "write_parquet_atomic", "read_bytes", "exists", "delete", "list_names", "read_parquet_dataset",
    "arrow_filesystem", "is_local", "check_reachable",
]

KEY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# Protocols whose single PUT (`fs.pipe`) creates the object atomically.
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})
_LOCAL = frozenset({"file", "local"})
# Environment that changes which endpoint or identity a filesystem talks to: part of the cache key,
# so a process that changes it (tests, notebooks) gets a fresh client rather than a stale one.
_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ACCESS_KEY_ID",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS",
)
# Listings must be fresh: other processes (Ray workers) write under the same prefixes, and a run
# re-lists `metadata/` to resume. s3fs/gcsfs keep a listings cache unless told not to. Retries with
# backoff (botocore's standard mode) are the store options models/ uses too (models/store.py).
_DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "s3": {"use_listings_cache": False},
    "s3a": {"use_listings_cache": False},
    "gs": {"use_listings_cache": False},
    "gcs": {"use_listings_cache": False},
}

_cache: dict[tuple, fsspec.AbstractFileSystem] = {}
_cache_lock = threading.Lock()


# --------------------------------------------------------------------------------------------
# Keys


def validate_key(key: Any) -> str | None:
    """None when `key` is a valid id (`[A-Za-z0-9][A-Za-z0-9._-]{0,127}`), else a one-line reason.

    The pattern has no "/" and must start with a letter or digit, so "..", "." and "../x" are all
    rejected; ids are safe as a single path component on every store.
    """
    if not isinstance(key, str):
        return f"id must be a string, got {type(key).__name__}"
    if not key:
        return "id is empty"
    shown = repr(key if len(key) <= 64 else key[:61] + "...")
    if key in (".", ".."):
        return f"id {shown} is not allowed"
    if len(key) > 128:
        return f"id {shown} is {len(key)} characters; the limit is 128"
    if not KEY_PATTERN.fullmatch(key):
        return (f"id {shown} is not a valid key: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit")
    return None


# --------------------------------------------------------------------------------------------
# Filesystems


def _protocol(uri: str) -> str:
    protocol, _ = split_protocol(str(uri))
    return protocol or "file"


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return _protocol(uri) in _LOCAL


def _filesystem(protocol: str, options: dict[str, Any]) -> fsspec.AbstractFileSystem:
    opts = {**store_options(f"{protocol}://"), **_DEFAULT_OPTIONS.get(protocol, {}), **options}
    env = tuple(os.environ.get(k) for k in _ENV_KEYS)
    key = (protocol, json.dumps(opts, sort_keys=True, default=repr), env, os.getpid())
    with _cache_lock:
        fs = _cache.get(key)
        if fs is None:
            try:
                cls = fsspec.get_filesystem_class(protocol)
            except ImportError as e:
                raise ImportError(f"{protocol}:// needs an extra package: {e}") from e
            # Our own cache is keyed on the environment too; fsspec's would hand back a client made
            # for an earlier AWS_ENDPOINT_URL.
            fs = cls(skip_instance_cache=True, **opts)
            _cache[key] = fs
        return fs


def resolve(uri: str, **options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path within it) for a local path, file://, s3://, gs://, memory:// URI.

    `options` are fsspec storage options for the protocol (e.g. `anon=True` for s3); filesystems
    are cached per protocol, options and the relevant environment, within a process.
    """
    uri = os.fspath(uri)
    protocol = _protocol(uri)
    if protocol in _LOCAL:
        fs = _filesystem("file", options)
        _, rest = split_protocol(uri)
        return fs, os.path.abspath(os.path.expanduser(rest))
    fs = _filesystem(protocol, options)
    return fs, fs._strip_protocol(uri)


def absolute(uri: str) -> str:
    """A local path or file:// URI as an absolute path; any other URI as it is. Output folders go
    through this, so the URIs their metadata records (video_uri, ...) read back from any directory
    and mean the same in processes (Ray workers, Serve replicas) that do not share the cwd."""
    return resolve(uri)[1] if is_local(uri) else os.fspath(uri)


def join(uri: str, *parts: str) -> str:
    """`uri` with `parts` appended with "/", keeping its protocol: join("s3://b/out", "videos", "a.mp4")."""
    uri = os.fspath(uri)
    out = uri
    for part in parts:
        part = str(part).strip("/")
        if not part:
            continue
        out = part if not out else (out if out.endswith("/") else out + "/") + part
    return out


# --------------------------------------------------------------------------------------------
# Writing


def _as_bytes(data: bytes | bytearray | memoryview | Iterable[bytes]) -> bytes | bytearray | memoryview:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return data
    if isinstance(data, str):
        raise TypeError("write_bytes_atomic takes bytes, not str")
    # An iterable of chunks is gathered first: an exception while producing it leaves nothing behind.
    return b"".join(data)


def write_bytes_atomic(uri: str, data: bytes | bytearray | memoryview | Iterable[bytes]) -> None:
    """Write `data` (bytes, or an iterable of byte chunks) to `uri`; readers see all of it or nothing.

    Parent folders are created as needed. A failure (including one raised by a chunk iterable)
    leaves the final key as it was and no temp file behind.
    """
    fs, path = resolve(uri)
    protocol = _protocol(uri)
    if protocol in _LOCAL:
        _write_local_atomic(path, data)
        return
    payload = bytes(_as_bytes(data))
    if protocol in _OBJECT_STORES:
        fs.pipe_file(path, payload)
        return
    parent, name = posixpath.split(path)
    tmp = posixpath.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    fs.makedirs(parent, exist_ok=True)
    try:
        fs.pipe_file(tmp, payload)
        fs.mv(tmp, path)
    except BaseException:
        try:
            fs.rm(tmp)
        except Exception:
            pass
        raise


def _write_local_atomic(path: str, data: Any) -> None:
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 honours the umask (mkstemp would leave the final file 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            elif isinstance(data, str):
                raise TypeError("write_bytes_atomic takes bytes, not str")
            else:
                for chunk in data:
                    f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not possible on every platform/filesystem
        dir_fd = os.open(parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_json_atomic(uri: str, obj: Any, *, indent: int | None = 2) -> None:
    """`obj` as UTF-8 JSON (datetimes and other non-JSON values via str()), written atomically."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False, default=str)
    write_bytes_atomic(uri, (text + "\n").encode("utf-8"))


def write_parquet_atomic(uri: str, table: pa.Table, *, compression: str = "zstd") -> None:
    """One Parquet file holding `table`, serialised in memory then written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    write_bytes_atomic(uri, memoryview(sink.getvalue()))


# --------------------------------------------------------------------------------------------
# Reading, listing, deleting


def read_bytes(uri: str) -> bytes:
    """The whole object at `uri`; FileNotFoundError when it is missing."""
    fs, path = resolve(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.exists(path)


def delete(uri: str, *, recursive: bool = False) -> bool:
    """Remove the object (or, with recursive=True, the whole prefix) at `uri`.

    Returns False when there was nothing to delete, True otherwise (on object stores that check is a
    HEAD before the DELETE, so a concurrent delete can make both callers see True).
    """
    fs, path = resolve(uri)
    try:
        # Object stores answer a DELETE of a missing key with success: ask first.
        if (recursive or not is_local(uri)) and not fs.exists(path):
            return False
        if recursive:
            fs.rm(path, recursive=True)
        else:
            fs.rm_file(path)
    except FileNotFoundError:
        return False
    return True


def _children(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    own = path.rstrip("/")
    out = []
    for e in entries:
        name = e["name"].rstrip("/")
        if name == own:  # a file at `path` itself, or an S3 "folder/" marker object
            continue
        if posixpath.basename(name).startswith("."):
            continue
        out.append({**e, "name": name})
    return out


def check_reachable(uri: str) -> None:
    """Raise (an OSError, a botocore error, ...) when the store holding `uri` cannot be listed: an
    endpoint that refuses connections, a missing bucket's neighbour errors, bad credentials. A folder
    that does not exist yet is fine. Asked with 2 attempts, not the usual retries, so a wrong endpoint
    is reported in about a second rather than after half a minute of backoff."""
    if is_local(uri):
        return
    protocol = _protocol(uri)
    options = {}
    if "config_kwargs" in (usual := store_options(uri)):
        options["config_kwargs"] = {**usual["config_kwargs"], "retries": {"mode": "standard", "total_max_attempts": 2}}
    fs, path = resolve(uri, **options)
    try:
        fs.ls(path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        bucket = path.split("/", 1)[0]
        if protocol in _OBJECT_STORES and bucket != path and not fs.exists(bucket):
            raise FileNotFoundError(f"no bucket {bucket!r} at {protocol}://") from None


def list_names(prefix_uri: str, suffix: str | None = None) -> list[str]:
    """Sorted basenames directly under `prefix_uri` (objects and sub-folders), optionally only those
    ending in `suffix`. Hidden names (".…", including in-flight temp files) are left out; a prefix
    that does not exist gives an empty list."""
    fs, path = resolve(prefix_uri)
    names = (posixpath.basename(e["name"]) for e in _children(fs, path))
    return sorted(n for n in names if suffix is None or n.endswith(suffix))


def list_sizes(prefix_uri: str) -> dict[str, int]:
    """Basename → size in bytes of the objects directly under `prefix_uri`, from one listing (no
    request per object); hidden names left out; {} when the prefix does not exist."""
    fs, path = resolve(prefix_uri)
    return {posixpath.basename(e["name"]): int(e.get("size") or 0) for e in _children(fs, path)
            if e.get("type") != "directory"}


def dataset_files(fs, path: str) -> dict[str, dict]:
    """{name: listing info} of a Parquet dataset folder's data files, at any depth, without the hidden and
    underscore names (a writer's temp files, _SUCCESS); {} when the folder is missing."""
    root = path.rstrip("/") + "/"
    try:
        listing = fs.find(path, detail=True)
    except FileNotFoundError:
        return {}
    return {name: info for name, info in listing.items() if name.startswith(root)
            and not any(part.startswith((".", "_")) for part in name[len(root):].split("/"))}


def read_parquet_dataset(uri: str, columns: list[str] | None = None) -> pa.Table | None:
    """All Parquet files in the folder `uri` (recursively; "." and "_" names skipped) as one table;
    `uri` may also name a single Parquet file.

    Files may have different columns (e.g. per-clip passthrough fields): schemas are merged, missing
    values are null. With `columns`, only those columns, in that order (all-null where no file has
    one). None when the folder is missing or holds no files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = resolve(uri)
    try:
        files = [path] if fs.isfile(path) else sorted(dataset_files(fs, path))
    except FileNotFoundError:
        return None
    if not files:
        return None

    def read_one(p: str) -> pa.Table | None:
        try:
            blob = fs.cat_file(p)
        except FileNotFoundError:  # deleted since the listing
            return None
        pf = pq.ParquetFile(pa.BufferReader(blob))
        names = pf.schema_arrow.names
        return pf.read(columns=[c for c in columns if c in names] if columns is not None else None)

    if len(files) == 1 or is_local(uri):
        tables = [read_one(p) for p in files]
    else:  # object stores: fetch concurrently
        with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
            tables = list(pool.map(read_one, files))
    tables = [t for t in tables if t is not None]
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="permissive")
    if columns is not None:
        for c in columns:
            if c not in table.column_names:
                table = table.append_column(c, pa.nulls(table.num_rows))
        table = table.select(columns)
    return table


# --------------------------------------------------------------------------------------------
# pyarrow / Ray Data


def arrow_filesystem(uri: str, **options: Any) -> tuple[pyarrow.fs.FileSystem, str]:
    """(pyarrow FileSystem, path) for `uri`, for Ray Data's `filesystem=` argument.

    Local paths get pyarrow's native LocalFileSystem; everything else is the same fsspec filesystem
    `resolve` returns, wrapped in `PyFileSystem(FSSpecHandler(fs))`, so endpoint and credential
    handling is identical. Both pickle: a Ray worker rebuilds the fsspec client from its own
    environment (which it inherits from the process that started Ray).
    """
    import pyarrow.fs as pafs

    fs, path = resolve(uri, **options)
    if is_local(uri):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
