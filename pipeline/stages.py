"""The stages a clip passes through, as Ray Data UDF classes (the `ray.data.llm` pattern).

Each stage loads its heavy state once in `__init__` and transforms one batch in `__call__`; the
work on one row lives in a plain method (`recaption_row`, `render_row`, `write_row`) that the
online endpoint reuses without Ray Data. A row that fails a stage keeps flowing with `error` and
`stage` set, so the driver records it and later stages leave it alone: a bad row never costs the
good ones. `Stage` pairs a UDF with the `map_batches` arguments it runs under.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import storage
from pipeline.errors import one_line
from pipeline.encode import encode_jpeg, encode_mp4, thumbnail_frame
from pipeline.recaption import load_recaptioner

#: Timing fields recorded per clip (seconds); the generator reports text, sample and decode.
TIMING_FIELDS = ("recaption", "text", "sample", "decode", "encode", "write")

METADATA_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("row", pa.int64()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("caption", pa.string()),
    ("recaptioner", pa.string()),
    ("mode", pa.string()),
    ("seed", pa.int64()),
    ("model", pa.struct([("name", pa.string()), ("version", pa.string()), ("weights_sha256", pa.string())])),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("frames", pa.int64()),
    ("fps", pa.int64()),
    ("seconds", pa.float64()),
    ("steps", pa.int64()),
    ("guidance", pa.float64()),
    ("timings", pa.struct([(name, pa.float64()) for name in TIMING_FIELDS])),
    ("video_uri", pa.string()),
    ("thumbnail_uri", pa.string()),
    ("video_sha256", pa.string()),
    ("frames_sha256", pa.string()),
    ("bytes", pa.int64()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("request_sha256", pa.string()),
    ("run_id", pa.string()),
])


def output_keys(out: str, clip_id: str) -> dict[str, str]:
    """Where a clip's files live under the run's output URI (deterministic: the resume key)."""
    return {
        "video": storage.join(out, "videos", f"{clip_id}.mp4"),
        "thumbnail": storage.join(out, "thumbnails", f"{clip_id}.jpg"),
        "metadata": storage.join(out, "metadata", f"{clip_id}.parquet"),
    }


def _each_row(batch: pd.DataFrame, stage: str, fn: Callable[[dict[str, Any]], None]) -> pd.DataFrame:
    """Apply `fn` to every row still in good standing; an exception fails that row alone."""
    rows = batch.to_dict("records")
    for row in rows:
        if row.get("error"):
            continue
        try:
            fn(row)
        except Exception as e:  # one row's failure must not cost the batch
            row["error"], row["stage"] = one_line(e), stage
    return pd.DataFrame.from_records(rows, columns=list(batch.columns) if not rows else None)


def _add_timing(row: dict[str, Any], **seconds: float) -> None:
    timings = json.loads(row.get("timings") or "{}")
    timings.update(seconds)
    row["timings"] = json.dumps(timings)


class RecaptionUDF:
    """prompt → caption, on CPU actors."""

    def __init__(self, recaptioner: str):
        self.recaptioner = load_recaptioner(recaptioner)

    def recaption_row(self, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        row["caption"] = self.recaptioner.recaption(row["prompt"], int(row["seed"]))
        row["recaptioner"] = self.recaptioner.name
        _add_timing(row, recaption=time.perf_counter() - t0)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _each_row(batch, "recaption", self.recaption_row)


class RenderUDF:
    """caption → frames, on a render replica (GPU actors, or CPU actors where there are none)."""

    def __init__(self, model: str, num_threads: int | None = None):
        from models.generator import load_generator  # torch loads in the actor, not the driver

        self.generator = load_generator(model, num_threads=num_threads)

    def render_row(self, row: dict[str, Any]) -> None:
        from models.interface import RenderRequest

        request = RenderRequest(
            caption=row["caption"], negative_caption=row.get("negative_prompt") or "",
            width=int(row["width"]), height=int(row["height"]), frames=int(row["frames"]),
            fps=int(row["fps"]), seed=int(row["seed"]), steps=int(row["steps"]),
            guidance=float(row["guidance"]),
        )
        out = self.generator.generate([request])[0]
        frames = np.ascontiguousarray(out.frames, dtype=np.uint8)
        row["frames_data"] = frames.tobytes()
        row["frames_shape"] = json.dumps(list(frames.shape))
        _add_timing(row, **out.timings)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _each_row(batch, "render", self.render_row)


@dataclass
class ClipWriter:
    """frames → MP4 + thumbnail + one metadata row, written atomically under `out`.

    The metadata file is written last: its presence means the clip is complete, and its
    `request_sha256` is what a rerun compares to skip work already done.
    """

    out: str
    model: dict[str, str]
    run_id: str

    def write(self, row: dict[str, Any], frames: np.ndarray) -> dict[str, Any]:
        keys = output_keys(self.out, row["id"])
        t0 = time.perf_counter()
        tags = {
            "title": row["id"],
            "comment": row["caption"],
            "encoder_generator": f"reelforge {self.model['name']} {self.model['version']}",
        }
        video = encode_mp4(frames, int(row["fps"]), metadata=tags)
        thumbnail = encode_jpeg(thumbnail_frame(frames))
        t1 = time.perf_counter()
        storage.write_bytes_atomic(keys["video"], video)
        storage.write_bytes_atomic(keys["thumbnail"], thumbnail)
        timings = json.loads(row.get("timings") or "{}")
        timings.update(encode=t1 - t0, write=time.perf_counter() - t1)
        record = {
            "id": row["id"], "row": int(row["row"]), "prompt": row["prompt"],
            "negative_prompt": row.get("negative_prompt") or "", "caption": row["caption"],
            "recaptioner": row["recaptioner"], "mode": row["mode"], "seed": int(row["seed"]),
            "model": dict(self.model), "width": int(frames.shape[2]), "height": int(frames.shape[1]),
            "frames": int(frames.shape[0]), "fps": int(row["fps"]),
            "seconds": frames.shape[0] / int(row["fps"]), "steps": int(row["steps"]),
            "guidance": float(row["guidance"]),
            "timings": {name: timings.get(name) for name in TIMING_FIELDS},
            "video_uri": keys["video"], "thumbnail_uri": keys["thumbnail"],
            "video_sha256": hashlib.sha256(video).hexdigest(), "bytes": len(video),
            # the raw frames' hash: what "rendered again bit-for-bit" is checked against
            "frames_sha256": hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest(),
            "created_at": dt.datetime.now(dt.timezone.utc), "request_sha256": row["request_sha256"],
            "run_id": self.run_id,
        }
        table = pa.Table.from_pylist([record], schema=METADATA_SCHEMA)
        passthrough = _passthrough_table(row.get("passthrough"))
        for name in passthrough.column_names:
            column = name if name not in table.column_names else f"manifest_{name}"
            table = table.append_column(column, passthrough.column(name))
        storage.write_parquet_atomic(keys["metadata"], table)
        return record


class WriteUDF:
    """Encode and write each rendered clip (CPU); the frames leave the dataset here."""

    def __init__(self, out: str, model: dict[str, str], run_id: str):
        self.writer = ClipWriter(out, model, run_id)

    def write_row(self, row: dict[str, Any]) -> None:
        record = self.writer.write(row, row_frames(row))
        row["video_uri"] = record["video_uri"]
        row["timings"] = json.dumps(record["timings"])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = _each_row(batch, "write", self.write_row)
        return out.drop(columns=["frames_data", "frames_shape", "passthrough"], errors="ignore")


def row_frames(row: dict[str, Any]) -> np.ndarray:
    """The frames `RenderUDF.render_row` left in a row, as uint8 (T, H, W, 3)."""
    return np.frombuffer(row["frames_data"], dtype=np.uint8).reshape(json.loads(row["frames_shape"]))


def passthrough_bytes(values: dict[str, Any], schema: pa.Schema) -> bytes:
    """One manifest row's pass-through columns as Arrow IPC bytes: types survive the trip."""
    if not values:
        return b""
    table = pa.Table.from_pylist([values], schema=schema)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _passthrough_table(data: bytes | None) -> pa.Table:
    if not data:
        return pa.table({})
    with pa.ipc.open_stream(io.BytesIO(data)) as reader:
        return reader.read_all()


@dataclass
class Stage:
    """A UDF class and the `map_batches` arguments it runs under."""

    udf: type
    constructor_kwargs: dict[str, Any]
    map_batches_kwargs: dict[str, Any] = field(default_factory=dict)

    def apply(self, ds):
        return ds.map_batches(
            self.udf, fn_constructor_kwargs=self.constructor_kwargs, batch_format="pandas",
            **self.map_batches_kwargs,
        )
