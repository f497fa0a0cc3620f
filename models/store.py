"""How every object-store client reelforge makes talks to its store: one set of fsspec options per
protocol (`store_options`), shared by `models/` (model folders, configs, weights) and `pipeline/storage.py` (manifests,
outputs, Ray Data's pyarrow filesystems) through `models.interface`.

S3 (s3fs over aiobotocore) retries in botocore's *standard* mode: up to `S3_MAX_ATTEMPTS` attempts
per request (AWS_MAX_ATTEMPTS), with exponential backoff and jitter (1, 2, 4, 8 … s, at most 20 s) on throttling
(503 SlowDown), 5xx answers, connection resets, refused connections and timeouts. s3fs adds its own
retries on top for SlowDown and timeouts. Every write is a single PUT of a whole object, so a
retried PUT either lands whole or not at all: retries never leave a partial object at a final key.
The cost: a store that is down for good takes about half a minute per request to give up.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec.core import split_protocol

#: attempts per S3 request (the first one counted) unless AWS_MAX_ATTEMPTS says otherwise
S3_MAX_ATTEMPTS = 6


def store_options(uri: str) -> dict[str, Any]:
    """The fsspec storage options for `uri`'s protocol (empty for local paths and other stores).
    `total_max_attempts` counts the first attempt, as AWS_MAX_ATTEMPTS does (botocore's Config
    `max_attempts` would count retries only).

    The standard AWS_RETRY_MODE (standard, adaptive) and AWS_MAX_ATTEMPTS override the defaults,
    read on each call (botocore gives an explicit Config precedence over them otherwise)."""
    protocol, _ = split_protocol(str(uri))
    if protocol not in ("s3", "s3a"):
        return {}
    retries = {"mode": os.environ.get("AWS_RETRY_MODE") or "standard",
               "total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or S3_MAX_ATTEMPTS)}
    return {"config_kwargs": {"retries": retries, "connect_timeout": 5, "read_timeout": 30}}


def store_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """`fsspec.core.url_to_fs(uri)` with the store's options (retries)."""
    return fsspec.core.url_to_fs(str(uri), **store_options(uri))


def store_open(uri: str, mode: str = "rb"):
    """`fsspec.open(uri, mode)` with the store's options (retries)."""
    return fsspec.open(str(uri), mode, **store_options(uri))
