"""Review verdicts under a run's OUT: `reviews/` is a Parquet dataset with one file per verdict
(id, verdict, note, reviewer, time), and the latest verdict per clip wins.

One file per verdict, each written atomically (`storage.write_parquet_atomic`) under a name no other
writer can pick (the time, then a random suffix): two reviewers, or two gallery servers over one
bucket, never rewrite each other's files, so no verdict is lost and no read-modify-write is needed.
Reading takes every file and keeps, per clip, the row with the latest time (ties: the later name).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable

import pyarrow as pa

from pipeline import storage
from pipeline.errors import UserError

VERDICTS = ("approved", "rejected", "none")  # "none": back to unreviewed (a note alone keeps the state)
MAX_NOTE_CHARS = 2000
REVIEWS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("verdict", pa.string()),
    ("note", pa.string()),
    ("reviewer", pa.string()),
    ("time", pa.timestamp("us", tz="UTC")),
])


class ReviewError(UserError):
    """A verdict that cannot be recorded (unknown clip, verdict or an over-long note)."""


def reviews_uri(out: str) -> str:
    return storage.join(out, "reviews")


def append_verdict(out: str, clip_id: str, verdict: str, note: str = "", reviewer: str = "") -> dict:
    """Record one verdict for `clip_id` as its own file under OUT/reviews/; returns the row written."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    if (reason := storage.validate_key(clip_id)) is not None:
        raise ReviewError(f"clip id: {reason}")
    if len(note) > MAX_NOTE_CHARS:
        raise ReviewError(f"note is longer than {MAX_NOTE_CHARS} characters")
    now = dt.datetime.now(dt.timezone.utc)
    row = {"id": clip_id, "verdict": verdict, "note": note, "reviewer": reviewer[:200], "time": now}
    name = f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:12]}.parquet"
    storage.write_parquet_atomic(storage.join(reviews_uri(out), name), pa.Table.from_pylist([row], REVIEWS_SCHEMA))
    return row


def latest_verdicts(out: str, read: Callable[[str], pa.Table | None] = storage.read_parquet_dataset) -> dict[str, dict]:
    """{clip id: its latest review row} over every file under OUT/reviews/ ({} when there are none);
    `read` reads the dataset (the gallery passes its `CachedDatasets.read`)."""
    table = read(reviews_uri(out))
    if table is None or table.num_rows == 0:
        return {}
    latest: dict[str, dict] = {}
    # a file's name starts with its time, so sorting by time and then by position (the dataset reads
    # files in name order) makes the last row per id the latest verdict
    for row in sorted(enumerate(table.select(REVIEWS_SCHEMA.names).to_pylist()), key=lambda r: (r[1]["time"], r[0])):
        latest[row[1]["id"]] = row[1]
    return latest
