"""Durable state of the online endpoint's video jobs, in one SQLite file.

A job row is written (status `queued`) before the API answers a create, so an accepted job
survives a restart of the app: on start the dispatcher takes every `queued` and `in_progress` row
again (`pending`), oldest first. Whether a job must actually render is decided by its outputs, not
by this table: the render deployment skips a job whose metadata (written last) already records the
same request hash, exactly like `reel render`'s resume, so a job is never rendered twice.

Admission is one transaction (`admit`): the queue bound and the per-key in-flight bound are
checked and the row inserted under SQLite's write lock, so two concurrent creates cannot both take
the last slot.

One node: SQLite wants a local filesystem (WAL mode, file locks). A deployment with ingress
replicas on several nodes should put this table in a real database; the interface here is small
(admit, get, page, claim, update, delete, pending, counts) so that is a contained change.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

ACTIVE = ("queued", "in_progress")
STATUSES = ("queued", "in_progress", "completed", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    completed_at INTEGER,
    expires_at INTEGER,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    seconds TEXT NOT NULL,
    size TEXT NOT NULL,
    error TEXT,
    remixed_from_video_id TEXT,
    request_sha256 TEXT NOT NULL,
    spec TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
"""


@dataclass
class Job:
    """One video job. `spec` is its validated render request (a `ClipSpec`'s fields);
    `owner` identifies the API key that created it (a hash, never the key)."""

    id: str
    owner: str
    model: str
    prompt: str
    seconds: str
    size: str
    request_sha256: str
    spec: dict[str, Any]
    status: str = "queued"
    progress: int = 0
    created_at: int = field(default_factory=lambda: int(time.time()))
    completed_at: int | None = None
    expires_at: int | None = None
    error: dict[str, str] | None = None
    remixed_from_video_id: str | None = None
    seq: int | None = None


class Rejected(Exception):
    """`admit` refused a job: `reason` says why ("queue" full or the key's "inflight" limit)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class JobStore:
    """The jobs table. Thread-safe within a process; one connection, short transactions."""

    def __init__(self, path: str):
        self.path = os.path.abspath(os.path.expanduser(path))
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an answered create is on disk
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _tx(self):
        return _Transaction(self._db, self._lock)

    # -- writes --------------------------------------------------------------------------------

    def admit(self, job: Job, *, max_queued: int, max_inflight_per_owner: int) -> Job:
        """Insert `job` unless the queue already holds `max_queued` queued jobs or its owner has
        `max_inflight_per_owner` jobs queued or in progress (raises `Rejected`)."""
        with self._tx() as db:
            inflight = db.execute("SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN (?, ?)",
                                  (job.owner, *ACTIVE)).fetchone()[0]
            if inflight >= max_inflight_per_owner:
                raise Rejected("inflight", f"this API key already has {inflight} videos queued or in progress "
                                           f"(the limit is {max_inflight_per_owner}); retry when one completes")
            queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
            if queued >= max_queued:
                raise Rejected("queue", f"the render queue is full ({queued} videos queued); retry later")
            row = _to_row(job)
            row.pop("seq")
            cur = db.execute(f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                             tuple(row.values()))
            job.seq = cur.lastrowid
        return job

    def claim(self, job_id: str) -> Job | None:
        """queued → in_progress; None when the job is gone or not queued (deleted, taken)."""
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET status = 'in_progress', progress = 0 WHERE id = ? AND status = 'queued'",
                             (job_id,))
            if not cur.rowcount:
                return None
            return _from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def update(self, job_id: str, **fields: Any) -> bool:
        """Set fields of a job; False when it no longer exists (deleted meanwhile)."""
        if "error" in fields and fields["error"] is not None:
            fields["error"] = json.dumps(fields["error"])
        sets = ", ".join(f"{k} = ?" for k in fields)
        with self._tx() as db:
            return bool(db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id)).rowcount)

    def delete(self, job_id: str) -> bool:
        with self._tx() as db:
            return bool(db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount)

    def requeue_active(self) -> list[Job]:
        """On start: every job left queued or in progress goes back to queued; returns them, oldest first."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = 'queued', progress = 0 WHERE status = 'in_progress'")
            rows = db.execute("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq").fetchall()
        return [_from_row(r) for r in rows]

    # -- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str, owner: str | None = None) -> Job | None:
        """The job, or None when it does not exist (or belongs to another owner)."""
        with self._tx() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        job = _from_row(row) if row else None
        return job if job and (owner is None or job.owner == owner) else None

    def page(self, owner: str, *, after: str | None, limit: int, order: str) -> tuple[list[Job], bool]:
        """(up to `limit` jobs of `owner` after the job `after` in `order`, whether more follow).
        Raises KeyError when `after` names no job of this owner."""
        desc = order == "desc"
        with self._tx() as db:
            args: list[Any] = [owner]
            where = "owner = ?"
            if after:
                row = db.execute("SELECT seq FROM jobs WHERE id = ? AND owner = ?", (after, owner)).fetchone()
                if row is None:
                    raise KeyError(after)
                where += " AND seq < ?" if desc else " AND seq > ?"
                args.append(row["seq"])
            rows = db.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY seq {'DESC' if desc else 'ASC'} LIMIT ?",
                              (*args, limit + 1)).fetchall()
        return [_from_row(r) for r in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        """Jobs per status (every status present, 0 when none)."""
        with self._tx() as db:
            rows = db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return {**dict.fromkeys(STATUSES, 0), **{r[0]: r[1] for r in rows}}

    def ping(self) -> None:
        with self._tx() as db:
            db.execute("SELECT 1").fetchone()


class _Transaction:
    """`with` block = one IMMEDIATE transaction (the write lock taken up front) under the thread lock."""

    def __init__(self, db: sqlite3.Connection, lock: threading.Lock):
        self.db, self.lock = db, lock

    def __enter__(self) -> sqlite3.Connection:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


def _to_row(job: Job) -> dict[str, Any]:
    row = asdict(job)
    row["spec"] = json.dumps(job.spec)
    row["error"] = json.dumps(job.error) if job.error is not None else None
    return row


def _from_row(row: sqlite3.Row) -> Job:
    values = dict(row)
    values["spec"] = json.loads(values["spec"])
    values["error"] = json.loads(values["error"]) if values["error"] else None
    return Job(**values)

