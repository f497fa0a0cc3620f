"""What a clip leaves under a run's output URI: where its files live (`output_keys`, the resume
key) and its metadata row (`METADATA_SCHEMA`, with the manifest's pass-through columns carried as
Arrow IPC bytes along the stages: `passthrough_bytes` / `passthrough_table`)."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.media.encode import VIDEO_CODECS

#: Timing fields recorded per clip (seconds); the generator reports text, sample and decode.
TIMING_FIELDS = ("recaption", "inputs", "text", "sample", "decode", "encode", "write")

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
    ("dtype", pa.string()),  # the precision the model ran in (float32, bfloat16, float16)
    ("timings", pa.struct([(name, pa.float64()) for name in TIMING_FIELDS])),
    ("codec", pa.string()),  # of the file at video_uri (h264: MP4, ffv1: Matroska) or image_uri (png)
    ("video_uri", pa.string()),
    ("image_uri", pa.string()),
    ("thumbnail_uri", pa.string()),
    ("video_sha256", pa.string()),
    ("frames_sha256", pa.string()),
    ("bytes", pa.int64()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    ("request_sha256", pa.string()),
    ("run_id", pa.string()),
    # the generation modes: inputs by URI, and what shaped the output
    ("inputs", pa.struct([(name, pa.string()) for name in ("image", "image_end", "video", "video_end")])),
    ("direction", pa.string()),
    ("extension_only", pa.bool_()),
    ("strength", pa.float64()),
    ("faces_blurred", pa.int64()),  # face detections blurred; null: blurring was off
    ("step_cache", pa.float64()),  # the step cache's threshold; null: off
    ("steps_computed", pa.int64()),  # with the step cache, sampling steps that ran every block (all windows)
    ("shots", pa.list_(pa.struct([("prompt", pa.string()), ("caption", pa.string()), ("start_frame", pa.int64()),
                                  ("frames", pa.int64()), ("seconds", pa.float64()), ("seed", pa.int64())]))),
    # LoRA adapters applied (null: none): the file's URI, its scale, the sha256 of the file that ran
    ("lora", pa.list_(pa.struct([("uri", pa.string()), ("scale", pa.float64()), ("sha256", pa.string())]))),
])


def output_keys(out: str, clip_id: str, codec: str = "h264") -> dict[str, str]:
    """Where a clip's files live under the run's output URI (deterministic: the resume key); the video's
    extension is its codec's (VIDEO_CODECS: videos/{id}.mp4 for h264, videos/{id}.mkv for ffv1)."""
    return {
        "video": storage.join(out, "videos", f"{clip_id}.{VIDEO_CODECS[codec]}"),
        "image": storage.join(out, "images", f"{clip_id}.png"),
        "thumbnail": storage.join(out, "thumbnails", f"{clip_id}.jpg"),
        "metadata": storage.join(out, "metadata", f"{clip_id}.parquet"),
    }


def passthrough_bytes(values: dict[str, Any], schema: pa.Schema) -> bytes:
    """One manifest row's pass-through columns as Arrow IPC bytes: types survive the trip."""
    if not values:
        return b""
    table = pa.Table.from_pylist([values], schema=schema)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def passthrough_table(data: bytes | None) -> pa.Table:
    """The pass-through columns `passthrough_bytes` made, back as a one-row table (no columns: none)."""
    if not data:
        return pa.table({})
    with pa.ipc.open_stream(io.BytesIO(data)) as reader:
        return reader.read_all()
