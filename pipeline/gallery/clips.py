"""What the gallery shows of one run's OUT: each rendered clip as a display record (from metadata/
and the latest verdicts under reviews/), the facets to filter and group by with their counts, the
failed rows of errors/, and the spritesheets it scrubs on hover.

Media are addressed by their key under OUT (`videos/{id}.mp4`, `images/{id}.png`,
`thumbnails/{id}.jpg`, `gallery/sprites/{id}.jpg`), not by the absolute URIs the metadata records,
so an OUT copied to another bucket or folder (or served from static hosting) still shows.
"""

from __future__ import annotations

import datetime as dt
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import storage
from pipeline.errors import UserError
from pipeline.gallery.reviews import latest_verdicts
from pipeline.media.contact_sheet import GAP, spritesheet, spritesheet_grid
from pipeline.stages.metadata import METADATA_SCHEMA

#: A pass-through column becomes a facet when it has at most this many distinct values (a
#: campaign's axes, placement, aspect); columns with one value per clip are shown in the panel only.
MAX_FACET_VALUES = 24
SPRITES = "gallery/sprites"


class GalleryError(UserError):
    """OUT holds no run the gallery can show."""


@dataclass
class Facet:
    """One way to filter and group: `key` is the clip record's field (`columns.NAME` for a
    pass-through column), `counts` each value's number of clips, most common first."""

    key: str
    label: str
    counts: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Run:
    out: str
    clips: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    facets: list[Facet]

    def clip(self, clip_id: str) -> dict[str, Any] | None:
        return next((c for c in self.clips if c["id"] == clip_id), None)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def media_keys(clip_id: str, codec: str, video_uri: str, image_uri: str) -> dict[str, str]:
    """A clip's media as keys relative to OUT: the video (or still), its thumbnail and spritesheet."""
    if codec == "png":
        media = f"images/{posixpath.basename(image_uri) or clip_id + '.png'}"
    else:
        media = f"videos/{posixpath.basename(video_uri) or clip_id + '.mp4'}"
    return {"media": media, "thumbnail": f"thumbnails/{clip_id}.jpg", "sprite": f"{SPRITES}/{clip_id}.jpg"}


def clip_record(row: dict[str, Any], passthrough: list[str], review: dict | None) -> dict[str, Any]:
    """One metadata row as the page shows it (JSON-able: the panel reads it from the page)."""
    codec = row.get("codec") or "h264"
    model = row.get("model") or {}
    columns, rows = spritesheet_grid(int(row["frames"] or 1))
    return {
        "id": row["id"], "prompt": row["prompt"], "caption": row["caption"], "negative_prompt": row["negative_prompt"],
        "seed": row["seed"], "mode": row["mode"] or "t2v",
        "model": f"{model.get('name') or '?'} {model.get('version') or ''}".strip(),
        "weights_sha256": model.get("weights_sha256") or "",
        "size": f"{row['width']}x{row['height']}", "width": row["width"], "height": row["height"],
        "frames": row["frames"], "fps": row["fps"], "seconds": round(row["seconds"] or 0, 3),
        "steps": row["steps"], "guidance": row["guidance"], "dtype": row.get("dtype") or "",
        "codec": codec, "still": codec == "png", "playable": codec == "h264",
        "timings": {k: round(v, 3) for k, v in (row.get("timings") or {}).items() if v is not None},
        "created_at": row["created_at"].isoformat(timespec="seconds") if row.get("created_at") else "",
        "video_sha256": row.get("video_sha256") or "",
        "sprite_grid": [columns, rows, GAP],
        **media_keys(row["id"], codec, row.get("video_uri") or "", row.get("image_uri") or ""),
        "columns": {name: _text(row.get(name)) for name in passthrough},
        "review": (review or {}).get("verdict") or "none", "note": (review or {}).get("note") or "",
        "reviewer": (review or {}).get("reviewer") or "",
        "reviewed_at": review["time"].isoformat(timespec="seconds") if review else "",
    }


def facet_value(clip: dict[str, Any], key: str) -> str:
    """The value of facet `key` ("mode", "model", "review", "columns.NAME") for a clip record."""
    if key.startswith("columns."):
        return clip["columns"].get(key[len("columns."):], "")
    return str(clip[key])


def facets_of(clips: list[dict[str, Any]], passthrough: list[str]) -> list[Facet]:
    """The facets with their counts: the pass-through columns with few values, mode, model, review."""
    keys = [(f"columns.{name}", name) for name in passthrough]
    keys += [("mode", "mode"), ("model", "model"), ("codec", "codec"), ("review", "review")]
    facets = []
    for key, label in keys:
        counts: dict[str, int] = {}
        for clip in clips:
            value = facet_value(clip, key)
            counts[value] = counts.get(value, 0) + 1
        if key.startswith("columns.") and (len(counts) > MAX_FACET_VALUES or len(counts) == len(clips) > 1):
            continue
        if key == "review":
            counts = {state: counts.get(state, 0) for state in ("none", "approved", "rejected")}
        facets.append(Facet(key, label, sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
                            if key != "review" else list(counts.items())))
    return facets


def load_run(out: str, read: Callable[[str], pa.Table | None] = storage.read_parquet_dataset) -> Run:
    """The run under `out` as the gallery shows it (GalleryError when there is no metadata/ there);
    `read` reads a dataset folder (the server passes its `CachedDatasets.read`)."""
    meta = read(storage.join(out, "metadata"))
    errors = read(storage.join(out, "errors"))
    if (meta is None or meta.num_rows == 0) and (errors is None or errors.num_rows == 0):
        raise GalleryError(f"no rendered clips under {out} (no metadata/ and no errors/): is it a reel render OUT?")
    verdicts = latest_verdicts(out, read)
    clips: list[dict[str, Any]] = []
    passthrough: list[str] = []
    if meta is not None and meta.num_rows:
        passthrough = [name for name in meta.column_names if name not in METADATA_SCHEMA.names]
        rows = sorted(meta.to_pylist(), key=lambda r: (r.get("row") if r.get("row") is not None else 0, r["id"]))
        clips = [clip_record(r, passthrough, verdicts.get(r["id"])) for r in rows]
    failed = [] if errors is None else sorted(errors.to_pylist(), key=lambda r: (r.get("row") or 0, r.get("id") or ""))
    return Run(out, clips, failed, facets_of(clips, passthrough))


def ensure_sprite(out: str, clip: dict[str, Any]) -> bytes:
    """The clip's spritesheet JPEG under OUT/gallery/sprites/, made from its video (MP4 or Matroska:
    ffmpeg decodes both) on first use; a still's is its thumbnail."""
    from pipeline.media.encode import decode_mp4, encode_jpeg

    uri = storage.join(out, clip["sprite"])
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        pass
    if clip["still"]:
        return storage.read_bytes(storage.join(out, clip["thumbnail"]))
    data = encode_jpeg(spritesheet(decode_mp4(storage.read_bytes(storage.join(out, clip["media"])))), quality=85)
    storage.write_bytes_atomic(uri, data)
    return data


def provenance_summary(out: str, clip: dict[str, Any]) -> dict[str, Any]:
    """`reel verify`'s verdict on the clip's file, in a few fields for the panel."""
    from pipeline.media.provenance import read_provenance

    report = read_provenance(storage.read_bytes(storage.join(out, clip["media"])))
    mark, c2pa, tags = report.get("watermark") or {}, report.get("c2pa"), report.get("tags") or {}
    return {
        "ok": report["ok"], "watermark": bool(mark.get("detected")), "score": mark.get("score"),
        "tags_model": " ".join(filter(None, (tags.get("model"), tags.get("model_version")))) or None,
        "caption_matches": report.get("caption_matches"),
        "c2pa": c2pa and c2pa.get("state"),
        "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
