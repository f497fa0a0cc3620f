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

from models.interface import GridLimits
from pipeline import storage
from pipeline.errors import one_line
from pipeline.media.encode import encode_jpeg, encode_mp4, encode_png, thumbnail_frame
from pipeline.stages.modes import inputs_bytes, inputs_from_bytes, load_inputs, render_clip
from pipeline.media.provenance import C2paConfig, Provenance, c2pa_config_from_env, sign_c2pa
from pipeline.prompt.recaption import load_recaptioner
from pipeline.media.watermark import embed_watermark

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
    ("timings", pa.struct([(name, pa.float64()) for name in TIMING_FIELDS])),
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
    ("shots", pa.list_(pa.struct([("prompt", pa.string()), ("caption", pa.string()), ("start_frame", pa.int64()),
                                  ("frames", pa.int64()), ("seconds", pa.float64()), ("seed", pa.int64())]))),
])


def output_keys(out: str, clip_id: str) -> dict[str, str]:
    """Where a clip's files live under the run's output URI (deterministic: the resume key)."""
    return {
        "video": storage.join(out, "videos", f"{clip_id}.mp4"),
        "image": storage.join(out, "images", f"{clip_id}.png"),
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
    """prompt → caption, on CPU actors (a storyboard: one caption per shot, each shot's caption
    filling what its prompt leaves open from the shot before).

    The safety gate runs here too, before anything is sampled: on the prompts (a blocked prompt
    is not even recaptioned) and on the captions (what the model would be asked for). A blocked
    row fails at stage "safety" with `blocked by policy: <category>`.
    """

    def __init__(self, recaptioner: str, policy: str | None = None):
        from pipeline.prompt.safety.policy import load_policy

        self.recaptioner = load_recaptioner(recaptioner)
        self.policy = load_policy(policy)

    def recaption_row(self, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        seed = int(row["seed"])
        shots = [prompt for prompt, _ in json.loads(row["shots"])] if row.get("shots") else []
        if self._blocked(row, row["prompt"], row.get("negative_prompt"), *shots):
            return
        if shots:
            captions: list[str] = []
            for prompt in shots:
                captions.append(self.recaptioner.recaption(prompt, seed, context=captions[-1] if captions else ""))
            row["shot_captions"] = json.dumps(captions)
            row["caption"] = " ".join(captions)
        else:
            row["caption"] = self.recaptioner.recaption(row["prompt"], seed)
        row["recaptioner"] = self.recaptioner.name
        _add_timing(row, recaption=time.perf_counter() - t0)
        self._blocked(row, row["caption"])

    def _blocked(self, row: dict[str, Any], *texts: str | None) -> bool:
        from pipeline.prompt.safety.policy import blocked_reason

        verdict = self.policy.check(*(t or None for t in texts))
        if verdict is not None:
            row["error"], row["stage"] = blocked_reason(verdict), "safety"
        return verdict is not None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _each_row(batch, "recaption", self.recaption_row)


class InputsUDF:
    """A row's input pictures and clips (i2v, extend, interpolate, remix): read from their URIs and
    fitted to the row's size on CPU actors, so the render replicas only render."""

    def __init__(self, limits: GridLimits):
        self.limits = limits

    def inputs_row(self, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        row["inputs"] = inputs_bytes(load_inputs(row, self.limits))
        _add_timing(row, inputs=time.perf_counter() - t0)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _each_row(batch, "inputs", self.inputs_row)


class RenderUDF:
    """caption (+ inputs) → frames, on a render replica (GPU actors, or CPU actors where there are none).

    `parallel`: the replica's layout (models.config.ParallelConfig). More than one rank makes the
    replica a group of Ray actors, one per rank, that this actor drives (`pipeline.stages.replica`); one
    rank, or None, runs the model in this actor. `rank_bundle`: what each rank reserves. The
    group's placement group is named `placement_prefix` + this actor's id when a prefix is given,
    so that the actor, restarted by Ray, finds it again (and the driver removes a run's groups by
    the prefix when the run ends); inside a placement group already (Serve), that one is used.
    """

    def __init__(self, model: str, num_threads: int | None = None, parallel=None,
                 rank_bundle: dict[str, float] | None = None, placement_prefix: str | None = None):
        if parallel is not None and parallel.world_size > 1:
            import ray

            from pipeline.stages.replica import ModelParallelReplica

            actor = ray.get_runtime_context().get_actor_id()
            name = f"{placement_prefix}{actor}" if placement_prefix and actor else None
            self.generator = ModelParallelReplica(model, parallel, rank_bundle=rank_bundle, num_threads=num_threads,
                                                  placement_name=name)
        else:
            from models.interface import load_generator  # torch loads in the actor, not the driver

            self.generator = load_generator(model, num_threads=num_threads)

    def render_row(self, row: dict[str, Any]) -> None:
        frames, timings, shots = render_clip(self.generator, row, inputs_from_bytes(row.get("inputs")))
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        row["frames_data"] = frames.tobytes()
        row["frames_shape"] = json.dumps(list(frames.shape))
        row["inputs"] = b""
        if shots:
            row["shot_records"] = json.dumps(shots)
        _add_timing(row, **timings)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return _each_row(batch, "render", self.render_row)


@dataclass
class ClipWriter:
    """frames → MP4 (a still: PNG) + thumbnail + one metadata row, written atomically under `out`.

    On the way: faces blurred (when asked), the invisible watermark embedded (`reel verify` finds
    it), provenance tags in the file and a signed C2PA manifest when REEL_C2PA_KEY/_CERT are set.

    The metadata file is written last: its presence means the clip is complete, and its
    `request_sha256` is what a rerun compares to skip work already done.
    """

    out: str
    model: dict[str, str]
    run_id: str
    blur_faces: bool = False  # run-wide; a row's own `blur_faces` also turns it on
    c2pa: C2paConfig | None = field(default_factory=c2pa_config_from_env)  # REEL_C2PA_KEY / _CERT

    def write(self, row: dict[str, Any], frames: np.ndarray) -> dict[str, Any]:
        keys = output_keys(self.out, row["id"])
        t0 = time.perf_counter()
        faces = None
        if self.blur_faces or row.get("blur_faces"):
            from pipeline.media.faces import blur_faces

            frames, faces = blur_faces(frames)
        # provenance: an invisible watermark in every frame, tags in the file, C2PA when configured
        frames = embed_watermark(frames)
        record = Provenance.for_clip(self.model, row["caption"], seed=int(row["seed"]))
        tags = {"title": row["id"], "comment": row["caption"], **record.tags()}
        still = row["mode"] == "image"
        if still:  # a still is a PNG (lossless) under images/
            media = sign_c2pa(encode_png(frames[0], tags), record, mime_type="image/png", config=self.c2pa)
            media_key = keys["image"]
        else:
            media = sign_c2pa(encode_mp4(frames, int(row["fps"]), metadata=tags), record, config=self.c2pa)
            media_key = keys["video"]
        thumbnail = encode_jpeg(thumbnail_frame(frames))
        t1 = time.perf_counter()
        storage.write_bytes_atomic(media_key, media)
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
            "video_uri": "" if still else media_key, "image_uri": media_key if still else "",
            "thumbnail_uri": keys["thumbnail"],
            "video_sha256": hashlib.sha256(media).hexdigest(), "bytes": len(media),
            # the raw frames' hash: what "rendered again bit-for-bit" is checked against
            "frames_sha256": hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest(),
            "created_at": dt.datetime.now(dt.timezone.utc), "request_sha256": row["request_sha256"],
            "run_id": self.run_id,
            "inputs": {name: row.get(name) or None for name in ("image", "image_end", "video", "video_end")},
            "direction": row.get("direction") if row["mode"] == "extend" else None,
            "extension_only": bool(row.get("extension_only")) if row["mode"] == "extend" else None,
            "strength": float(row["strength"]) if row["mode"] == "remix" else None,
            "shots": json.loads(row.get("shot_records") or "null"),
            "faces_blurred": faces,
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

    def __init__(self, out: str, model: dict[str, str], run_id: str, blur_faces: bool = False,
                 c2pa: C2paConfig | None = None):
        self.writer = ClipWriter(out, model, run_id, blur_faces, c2pa)

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
