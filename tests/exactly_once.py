"""What every fault test checks of a finished run's outputs: one metadata row per id, and every video at
its final key whole (its bytes and sha256 the ones its metadata records): no partial object."""

from __future__ import annotations

import hashlib

from pipeline import storage


def check_outputs(out: str, ids: list[str]) -> list[dict]:
    """Assert one metadata file and row per id in `ids` (and no other) and whole videos; the rows."""
    table = storage.read_parquet_dataset(storage.join(out, "metadata"))
    meta = table.to_pylist() if table is not None else []
    assert sorted(m["id"] for m in meta) == sorted(ids)
    assert storage.list_names(storage.join(out, "metadata")) == sorted(f"{i}.parquet" for i in ids)
    for m in meta:
        video = storage.read_bytes(m["video_uri"])
        assert len(video) == m["bytes"] and hashlib.sha256(video).hexdigest() == m["video_sha256"], m["id"]
    return meta
