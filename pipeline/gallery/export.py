"""`reel campaign export OUT --approved`: the approved clips as a manifest, their rows as rendered
(prompt, size, frames, fps, seed, steps, guidance, mode and its inputs, and the manifest's own
pass-through columns with their types), so a team can render its picks again with another model,
size or step count (`reel render picks.parquet --model … --out …`)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.batch.manifest import COLUMN_TYPES
from pipeline.gallery.clips import GalleryError
from pipeline.gallery.reviews import latest_verdicts
from pipeline.stages.metadata import METADATA_SCHEMA

#: Modes whose metadata frame count is the count to ask for again. An extension's (unless
#: extension_only) and an interpolation's include their inputs' frames, and a storyboard's shots
#: carry their own seconds: those rows leave `frames` empty and take the model's default length.
_FRAMES_MODES = ("t2v", "image", "i2v", "remix")
INPUT_COLUMNS = ("image", "image_end", "video", "video_end")


def _manifest_row(meta: dict) -> dict:
    mode = meta["mode"] or "t2v"
    keeps_frames = mode in _FRAMES_MODES or (mode == "extend" and meta.get("extension_only"))
    row = {
        "id": meta["id"], "prompt": meta["prompt"], "negative_prompt": meta["negative_prompt"] or "",
        "frames": meta["frames"] if keeps_frames else None, "fps": meta["fps"], "width": meta["width"],
        "height": meta["height"], "seed": meta["seed"], "steps": meta["steps"], "guidance": meta["guidance"],
        "mode": mode, **{name: (meta.get("inputs") or {}).get(name) for name in INPUT_COLUMNS},
        "direction": meta.get("direction"), "extension_only": meta.get("extension_only"),
        "strength": meta.get("strength"),
        "shots": [{"prompt": s["prompt"], "seconds": s["seconds"]} for s in meta.get("shots") or []] or None,
        "blur_faces": meta.get("faces_blurred") is not None,
    }
    return row


def approved_manifest(out: str) -> pa.Table:
    """The manifest of the clips whose latest verdict under OUT/reviews/ is "approved", in manifest
    order (an empty table when none are)."""
    meta = storage.read_parquet_dataset(storage.join(out, "metadata"))
    if meta is None or meta.num_rows == 0:
        raise GalleryError(f"no rendered clips under {out} (no metadata/): is it a reel render OUT?")
    approved = sorted(clip_id for clip_id, review in latest_verdicts(out).items() if review["verdict"] == "approved")
    meta = meta.filter(pc.is_in(meta.column("id"), pa.array(approved, pa.string())))
    meta = meta.take(pc.sort_indices(meta, [("row", "ascending"), ("id", "ascending")]))
    rows = [_manifest_row(r) for r in meta.select([n for n in METADATA_SCHEMA.names if n in meta.column_names])
            .to_pylist()]
    names = ["id", "prompt", "negative_prompt", "frames", "fps", "width", "height", "seed", "steps", "guidance", "mode"]
    # the mode's columns only where some row uses them: a t2v campaign's picks read like its manifest
    names += [n for n in (*INPUT_COLUMNS, "direction", "extension_only", "strength", "shots", "blur_faces")
              if any(r[n] not in (None, False) for r in rows)]
    table = pa.Table.from_pylist([{n: r[n] for n in names} for r in rows],
                                 schema=pa.schema([(n, COLUMN_TYPES.get(n, pa.string())) for n in names]))
    for name in meta.column_names:  # the manifest's own columns, types kept
        if name in METADATA_SCHEMA.names:
            continue
        original = name.removeprefix("manifest_") if name.removeprefix("manifest_") in METADATA_SCHEMA.names else name
        table = table.append_column(original, meta.column(name))
    return table


def export_approved(out: str, dest: str) -> int:
    """Write the approved clips' manifest to `dest` (Parquet, or JSON Lines for .jsonl); their count."""
    table = approved_manifest(out)
    if dest.endswith(".jsonl"):
        from pipeline.batch.manifest import write_manifest

        write_manifest(table.to_pylist(), dest)
    else:
        storage.write_parquet_atomic(dest, table)
    return table.num_rows
