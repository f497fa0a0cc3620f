"""The write stage: frames → MP4 or FFV1 Matroska (a still: PNG) + thumbnail + metadata row, on CPU
actors (`WriteUDF`, around `ClipWriter`, which the online endpoint uses directly)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline import storage
from pipeline.media.encode import VIDEO_CODECS, encode_jpeg, encode_png, encode_video, thumbnail_frame
from pipeline.media.provenance import C2paConfig, Provenance, ProvenanceError, c2pa_config_from_env, sign_c2pa
from pipeline.media.watermark import embed_watermark
from pipeline.stages.base import each_row, optional_number
from pipeline.stages.metadata import METADATA_SCHEMA, TIMING_FIELDS, output_keys, passthrough_table
from pipeline.stages.render import row_frames


@dataclass
class ClipWriter:
    """frames → a video (a still: PNG) + thumbnail + one metadata row, written atomically under `out`.

    The video is `codec`'s (VIDEO_CODECS): h264 → videos/{id}.mp4, ffv1 → videos/{id}.mkv, a lossless
    RGB master; a file of the other codec left at the same id by an earlier run is removed, so
    videos/ holds what the metadata points at. On the way: faces blurred (when asked), the invisible
    watermark embedded (`reel verify` finds it), provenance tags in the file and a signed C2PA
    manifest when REEL_C2PA_KEY/_CERT are set (MP4 and PNG only: c2pa cannot sign Matroska, so
    signing with ffv1 is refused).

    The metadata file is written last: its presence means the clip is complete, and its
    `request_sha256` is what a rerun compares to skip work already done.
    """

    out: str
    model: dict[str, str]
    run_id: str
    blur_faces: bool = False  # run-wide; a row's own `blur_faces` also turns it on
    c2pa: C2paConfig | None = field(default_factory=c2pa_config_from_env)  # REEL_C2PA_KEY / _CERT
    codec: str = "h264"  # of the videos (VIDEO_CODECS); stills are PNG whatever it is

    def __post_init__(self):
        check_codec(self.codec, self.c2pa)

    def write(self, row: dict[str, Any], frames: np.ndarray) -> dict[str, Any]:
        keys = output_keys(self.out, row["id"], self.codec)
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
            media = encode_video(frames, int(row["fps"]), self.codec, metadata=tags)
            if self.codec == "h264":
                media = sign_c2pa(media, record, config=self.c2pa)
            media_key = keys["video"]
        thumbnail = encode_jpeg(thumbnail_frame(frames))
        t1 = time.perf_counter()
        storage.write_bytes_atomic(media_key, media)
        storage.write_bytes_atomic(keys["thumbnail"], thumbnail)
        if not still:  # a rerun with another codec: the old file goes, the metadata points at the new one
            for codec in VIDEO_CODECS.keys() - {self.codec}:
                storage.delete(output_keys(self.out, row["id"], codec)["video"])
        timings = json.loads(row.get("timings") or "{}")
        timings.update(encode=t1 - t0, write=time.perf_counter() - t1)
        record = {
            "id": row["id"], "row": int(row["row"]), "prompt": row["prompt"],
            "negative_prompt": row.get("negative_prompt") or "", "caption": row["caption"],
            "recaptioner": row["recaptioner"], "mode": row["mode"], "seed": int(row["seed"]),
            "model": dict(self.model), "width": int(frames.shape[2]), "height": int(frames.shape[1]),
            "frames": int(frames.shape[0]), "fps": int(row["fps"]),
            "seconds": frames.shape[0] / int(row["fps"]), "steps": int(row["steps"]),
            "guidance": float(row["guidance"]), "dtype": row.get("dtype") or None,
            "timings": {name: timings.get(name) for name in TIMING_FIELDS},
            "codec": "png" if still else self.codec,
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
            "lora": json.loads(row.get("lora_records") or "null"),
            "step_cache": optional_number(row.get("step_cache")),
            "steps_computed": None if optional_number(row.get("steps_computed")) is None
            else int(row["steps_computed"]),
        }
        table = pa.Table.from_pylist([record], schema=METADATA_SCHEMA)
        passthrough = passthrough_table(row.get("passthrough"))
        for name in passthrough.column_names:
            column = name if name not in table.column_names else f"manifest_{name}"
            table = table.append_column(column, passthrough.column(name))
        storage.write_parquet_atomic(keys["metadata"], table)
        return record


def check_codec(codec: str, c2pa: C2paConfig | None) -> None:
    """A codec the writer has (VIDEO_CODECS; else ValueError), and one c2pa can sign when signing is
    configured (else ProvenanceError); one line each, saying what to do."""
    if codec not in VIDEO_CODECS:
        raise ValueError(f"codec must be one of {', '.join(VIDEO_CODECS)}, got {codec!r}")
    if codec != "h264" and c2pa is not None:
        raise ProvenanceError(f"C2PA signing (REEL_C2PA_KEY/REEL_C2PA_CERT) cannot embed a manifest in the "
                              f"Matroska files --codec {codec} writes; use --codec h264, or unset both to write "
                              f"unsigned masters (they keep the watermark and tags)")


class WriteUDF:
    """Encode and write each rendered clip (CPU); the frames leave the dataset here."""

    def __init__(self, out: str, model: dict[str, str], run_id: str, blur_faces: bool = False,
                 c2pa: C2paConfig | None = None, codec: str = "h264"):
        self.writer = ClipWriter(out, model, run_id, blur_faces, c2pa, codec)

    def write_row(self, row: dict[str, Any]) -> None:
        record = self.writer.write(row, row_frames(row))
        row["video_uri"] = record["video_uri"]
        row["timings"] = json.dumps(record["timings"])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = each_row(batch, "write", self.write_row)
        return out.drop(columns=["frames_data", "frames_shape", "passthrough"], errors="ignore")
