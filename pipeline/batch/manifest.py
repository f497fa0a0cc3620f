"""Manifests: read a Parquet / JSON Lines manifest from any fsspec URI and validate its rows.

A manifest is one row per clip. Only `id` and `prompt` are required; unknown columns pass through
into the clip's metadata. Reading fails as a whole (`ManifestError`, exit code 2) only when the
manifest itself is unusable; a bad row becomes a `RowError` and the other rows go on.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
from dataclasses import KW_ONLY, asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from models.interface import MODES, GridLimits, RenderRequest
from pipeline import storage
from pipeline.batch.row_fields import (
    flag_value,
    integer_value,
    is_missing,
    lora_value,
    number_value,
    shots_value,
    text_value,
)
from pipeline.errors import UserError, one_line

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SEED_RANGE = (0, 2**32 - 1)

# Generation modes: `MODES` (a row's `mode`; inferred from its columns when missing, see `infer_mode`),
# of which a model renders `GridLimits.modes`.
DIRECTIONS = ("forward", "backward")
#: The strength of a remix whose row gives none.
DEFAULT_STRENGTH = 0.75

#: Columns the manifest contract defines; every other column passes through into the metadata.
KNOWN_COLUMNS = (
    "id", "prompt", "negative_prompt", "seconds", "frames", "fps", "width", "height", "seed", "steps",
    "guidance", "mode", "image", "image_end", "video", "video_end", "direction", "extension_only",
    "strength", "shots", "blur_faces", "lora", "step_cache",
)


class ManifestError(UserError):
    """The manifest as a whole cannot be used (missing, unreadable, wrong format, no prompt column)."""

    show_type = True


@dataclass(frozen=True)
class RowError:
    """A row that will not be rendered: `row` is its 0-based position in the manifest."""

    row: int
    id: str | None
    stage: str
    reason: str


@dataclass(frozen=True)
class ClipSpec:
    """A validated manifest row: everything needed to render it, plus what passes through."""

    row: int
    id: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    frames: int
    fps: int
    seed: int
    steps: int
    guidance: float
    mode: str
    passthrough: dict[str, Any] = field(default_factory=dict, compare=False)
    _: KW_ONLY  # the generation modes' fields
    image: str = ""
    image_end: str = ""
    video: str = ""
    video_end: str = ""
    direction: str = "forward"
    extension_only: bool = False
    strength: float = 1.0
    shots: tuple[tuple[str, int], ...] = ()
    blur_faces: bool = False
    step_cache: float | None = None  # the step cache's threshold (models/step_cache.py); None: off
    #: LoRA adapters: (uri, scale, version) each; version is the file's size and ETag / mtime when the row
    #: was read (`file_version`), so a file replaced at the same URI changes the resume key
    lora: tuple[tuple[str, float, str], ...] = ()

    @property
    def adapter_key(self) -> tuple:
        """What rows sharing adapters share: the driver sorts by it so a replica changes adapters between
        groups of rows, not from one row to the next."""
        return tuple(tuple(a) for a in self.lora)

    @property
    def seconds(self) -> float:
        return self.frames / self.fps

    def request_sha256(self, *, model_sha256: str, recaptioner: str, codec: str = "h264",
                       dtype: str | None = None) -> str:
        """Hash of everything that decides the frames and the file they land in: equal hash → the same
        clip (resume key).

        Media inputs enter by URI: an input replaced at the same URI does not re-render. LoRA adapters enter
        by URI, scale and the file's version (a file replaced at the same URI re-renders). The video
        `codec` enters when it is not h264 (so an H.264 clip keeps the key it had before codecs were
        chosen), and not for a still (a PNG whatever the codec). `dtype`, the precision asked for
        (`--dtype`), enters when given (None: the device's default, as before).
        """
        defaults = {f.name: f.default for f in fields(ClipSpec) if f.name in MODE_FIELDS}
        render = {k: v for k, v in asdict(self).items()
                  if k not in ("row", "passthrough") and not (k in defaults and v == defaults[k])}
        render.update(model_sha256=model_sha256, recaptioner=recaptioner)
        if codec != "h264" and self.mode != "image":
            render["codec"] = codec
        if dtype is not None:
            render["dtype"] = dtype
        return hashlib.sha256(json.dumps(render, sort_keys=True).encode()).hexdigest()


#: ClipSpec fields of the generation modes (and the LoRA adapters, the step cache); left out of the resume key at their
#: defaults, so a text→video clip keeps the key it had before the modes existed.
MODE_FIELDS = ("image", "image_end", "video", "video_end", "direction", "extension_only", "strength", "shots",
               "blur_faces", "lora", "step_cache")


COLUMN_TYPES = {"id": pa.string(), "prompt": pa.string(), "negative_prompt": pa.string(), "seconds": pa.float64(),
                "frames": pa.int64(), "fps": pa.int64(), "width": pa.int64(), "height": pa.int64(), "seed": pa.int64(),
                "steps": pa.int64(), "guidance": pa.float64(), "mode": pa.string(), "strength": pa.float64(),
                "extension_only": pa.bool_(), "blur_faces": pa.bool_(), "step_cache": pa.float64(),
                "shots": pa.list_(pa.struct([("prompt", pa.string()), ("seconds", pa.float64())]))}


def manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with the same keys) as a manifest table: the contract's columns with their
    types, strings for every pass-through column."""
    names = list(rows[0]) if rows else ["id", "prompt"]
    schema = pa.schema([(n, COLUMN_TYPES.get(n, pa.string())) for n in names])
    return pa.Table.from_pylist(rows, schema=schema)


def write_manifest(rows: list[dict[str, Any]], out: str) -> None:
    """Write rows as a Parquet manifest (or JSON Lines when `out` ends in .jsonl), atomically."""
    if out.endswith(".jsonl"):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        storage.write_bytes_atomic(out, data)
    else:
        storage.write_parquet_atomic(out, manifest_table(rows))


def default_seed(clip_id: str) -> int:
    """The seed of a row that names none: stable across runs and machines, derived from its id."""
    return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:4], "big")


# --------------------------------------------------------------------------------------------
# Reading


def read_manifest(uri: str) -> pa.Table:
    """Read a manifest: a Parquet file, a folder of Parquet files, or a JSON Lines file.

    JSON Lines are read line by line, so a malformed line or a value of the wrong type costs only
    its own row: such a row is kept with a `_line_error` column that validation reports.
    """
    try:
        fs, path = storage.resolve(uri)
        if not fs.exists(path):
            raise ManifestError(f"manifest not found: {uri}")
        if fs.isdir(path):
            files = sorted(
                p for p in fs.find(path)
                if not posixpath.basename(p).startswith((".", "_")) and fs.isfile(p)
            )
            if not files:
                raise ManifestError(f"manifest folder is empty: {uri}")
            tables = [_read_one(fs, p, uri) for p in files]
            try:
                table = pa.concat_tables(tables, promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise ManifestError(f"manifest files under {uri} have clashing schemas: {one_line(e, 300)}") from None
        else:
            table = _read_one(fs, path, uri)
    except ManifestError:
        raise
    except Exception as e:  # permissions, network, corrupt files: all unusable, one line each
        raise ManifestError(f"cannot read manifest {uri}: {one_line(e, 300)}") from e
    if "prompt" not in table.column_names and "shots" not in table.column_names:
        raise ManifestError(
            f"manifest {uri} has no 'prompt' column (columns: {', '.join(table.column_names) or 'none'})"
        )
    if table.num_rows == 0:  # a 0-row Parquet as an empty JSON Lines file: nothing to render is a mistake
        raise ManifestError(f"manifest {uri} has no rows")
    return table


def _read_one(fs, path: str, uri: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        data = f.read()
    name = path.lower()
    if data[:4] == b"PAR1" or name.endswith((".parquet", ".pq")):
        try:
            return pq.read_table(io.BytesIO(data))
        except Exception as e:
            raise ManifestError(f"{uri}: not a readable Parquet file ({one_line(e, 300)})") from None
    if name.endswith((".jsonl", ".ndjson", ".json")) or data.lstrip()[:1] == b"{":
        return _read_jsonl(data, uri)
    raise ManifestError(
        f"{uri}: not a Parquet or JSON Lines manifest (use .parquet, .jsonl or a folder of Parquet files)"
    )


def _read_jsonl(data: bytes, uri: str) -> pa.Table:
    records: list[dict[str, Any]] = []
    parsed = 0
    # Line by line, bytes first: a line that is not UTF-8 (a raw \xff) or holds a lone surrogate
    # (an escaped "\ud800" no encoder can write) costs its own row, not the manifest.
    for lineno, raw_line in enumerate(data.splitlines(), start=1):
        if not raw_line.strip():
            continue
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as e:
            records.append({"_line_error": f"line {lineno} is not UTF-8 text (byte {e.start})"})
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            records.append({"_line_error": f"line {lineno} is not valid JSON ({e.msg})"})
            continue
        if not isinstance(value, dict):
            records.append({"_line_error": f"line {lineno} is a JSON {type(value).__name__}, not an object"})
            continue
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            records.append({"_line_error": f"line {lineno} holds a lone surrogate escape (\\ud800-\\udfff): "
                                           "not valid Unicode text"})
            continue
        parsed += 1
        records.append(value)
    if records and not parsed:
        raise ManifestError(f"{uri}: no line is a JSON object; not a JSON Lines manifest")
    columns: dict[str, None] = {}
    for r in records:
        columns.update(dict.fromkeys(r))
    if not records:
        raise ManifestError(f"manifest {uri} has no rows")
    if "prompt" not in columns and "shots" not in columns:
        raise ManifestError(f"manifest {uri} has no 'prompt' field in any line")
    # Columns whose values do not share one type stay Python objects (as JSON text in Arrow);
    # validation converts each value on its own, so one wrong value fails only its row.
    arrays, mixed = {}, []
    for name in columns:
        values = [r.get(name) for r in records]
        kinds = {type(v) for v in values if v is not None}
        try:
            if bool in kinds and len(kinds) > 1:  # Arrow would read true as 1.0 among numbers: keep it apart
                raise pa.ArrowInvalid(f"{name} mixes booleans with other values")
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            arrays[name] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
            mixed.append(name)
    table = pa.table(arrays)
    return table.replace_schema_metadata({JSON_COLUMNS_KEY: json.dumps(mixed)}) if mixed else table


#: Schema metadata naming columns whose JSON values did not share a type: they hold JSON text,
#: decoded value by value during validation.
JSON_COLUMNS_KEY = b"reelforge.json_columns"


# --------------------------------------------------------------------------------------------
# Validation


def validate(table: pa.Table, limits: GridLimits) -> tuple[list[ClipSpec], list[RowError]]:
    """Check every row against the contract and the model's limits.

    Returns the rows to render (manifest order) and one `RowError` per rejected row. Duplicate ids:
    the first valid-looking row keeps the id, each later copy is an error.
    """
    mixed = set(json.loads((table.schema.metadata or {}).get(JSON_COLUMNS_KEY, b"[]")))
    versions: dict[str, list | None] = {}  # each adapter file looked up once
    passthrough_names = [n for n in table.column_names if n not in KNOWN_COLUMNS and not n.startswith("_")]
    rows = table.to_pylist()
    specs: list[ClipSpec] = []
    errors: list[RowError] = []
    first_row_of: dict[str, int] = {}
    for i, raw in enumerate(rows):
        if mixed:
            raw = {k: (json.loads(v) if k in mixed and isinstance(v, str) else v) for k, v in raw.items()}
        try:
            spec = _validate_row(i, raw, limits, {n: raw.get(n) for n in passthrough_names}, versions)
        except _Invalid as e:
            errors.append(RowError(i, e.clip_id, "validate", str(e)))
            continue
        if spec.id in first_row_of:
            reason = f"duplicate id {spec.id!r} (first used on row {first_row_of[spec.id]})"
            errors.append(RowError(i, spec.id, "validate", reason))
            continue
        first_row_of[spec.id] = i
        specs.append(spec)
    return specs, errors


class _Invalid(UserError):
    """One row's reason for failing validation (its text reads whole)."""

    def __init__(self, reason: str, clip_id: str | None):
        super().__init__(reason)
        self.clip_id = clip_id


def _validate_row(i: int, raw: dict[str, Any], limits: GridLimits, passthrough: dict,
                  versions: dict[str, list | None]) -> ClipSpec:
    clip_id = None
    if raw.get("_line_error"):
        raise _Invalid(raw["_line_error"], None)

    value = raw.get("id")
    if is_missing(value):
        raise _Invalid("id is missing", None)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _Invalid(f"id must be a string, got {type(value).__name__}", None)
    reason = storage.validate_key(value)
    if reason:
        raise _Invalid(reason, None)
    clip_id = value

    def bad(msg: str) -> _Invalid:
        return _Invalid(msg, clip_id)

    shots = shots_value(raw.get("shots"), bad)
    lora = lora_value(raw.get("lora"), limits, versions, bad)
    prompt = raw.get("prompt")
    if is_missing(prompt) and shots:
        prompt = " ".join(p for p, _ in shots)
    prompt = text_value(prompt, "prompt", bad)

    negative = raw.get("negative_prompt")
    negative = "" if is_missing(negative) else text_value(negative, "negative_prompt", bad, empty_ok=True)

    media = {}
    for name in ("image", "image_end", "video", "video_end"):
        value = raw.get(name)
        if is_missing(value) or (isinstance(value, str) and not value.strip()):
            continue
        if not isinstance(value, str):
            raise bad(f"{name} must be a URI (text), got {type(value).__name__}")
        media[name] = value.strip()
    strength = raw.get("strength")
    mode = raw.get("mode")
    mode = infer_mode(media, shots, not is_missing(strength)) if is_missing(mode) else mode
    if mode not in MODES:
        raise bad(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    _check_mode_columns(mode, media, shots, not is_missing(strength), bad)
    try:  # a mode the model cannot render (i2v on a text-to-video checkpoint): this row only
        limits.check_mode(mode)
    except ValueError as e:
        raise bad(str(e)) from None

    direction = raw.get("direction")
    direction = "forward" if is_missing(direction) else str(direction).strip().lower()
    if direction not in DIRECTIONS:
        raise bad(f"direction must be forward or backward, got {raw.get('direction')!r}")
    strength = DEFAULT_STRENGTH if is_missing(strength) else number_value(strength, "strength", DEFAULT_STRENGTH, bad)
    if mode != "remix":
        strength = 1.0
    elif not 0 <= strength <= 1:
        raise bad(f"strength={strength:g} is outside 0..1 (0 keeps the video, 1 ignores it)")

    fps = integer_value(raw.get("fps"), "fps", limits.default_fps, bad)
    given_frames = raw.get("frames")
    if not is_missing(given_frames):
        if not is_missing(raw.get("seconds")):
            raise bad("give seconds or frames, not both")
        if shots or mode == "image":
            why = "each shot has its seconds" if shots else "a still is one frame"
            raise bad(f"mode {mode} does not use frames ({why})")
        frames = integer_value(given_frames, "frames", 0, bad)
        if frames <= 0:
            raise bad(f"frames must be positive, got {frames}")
        seconds = frames / fps if fps > 0 else 0.0
    elif shots:
        if fps <= 0:
            raise bad(f"fps must be positive, got {fps}")
        shots = tuple((p, limits.frames_for(sec, fps)) for p, sec in shots)
        frames = sum(f for _, f in shots)
        seconds = frames / fps
    else:
        seconds = number_value(raw.get("seconds"), "seconds", limits.default_seconds, bad)
        if seconds <= 0:
            raise bad(f"seconds must be positive, got {seconds:g}")
        frames = limits.min_frames if mode == "image" else limits.frames_for(seconds, fps)
    what = ("the storyboard" if shots else "the new part" if mode == "extend"
            else "the gap" if "video_end" in media else None)
    if fps > 0 and frames > limits.max_frames and (what or is_missing(given_frames)):  # else check names the maximum
        raise bad(f"{what or f'seconds={seconds:g}'} at {fps} fps is {frames} frames; the model's maximum is "
                  f"{limits.max_frames} frames ({limits.max_frames / fps:g} s at {fps} fps)")
    # Modes that start from a picture or a clip take its size when the row gives none (0 here;
    # the inputs stage sets it from the input, snapped to the model's grid).
    from_input = mode in ("i2v", "extend", "interpolate", "remix")
    width = integer_value(raw.get("width"), "width", 0 if from_input else limits.default_width, bad)
    height = integer_value(raw.get("height"), "height", 0 if from_input else limits.default_height, bad)
    for name, size in (("width", width), ("height", height)):
        if not is_missing(raw.get(name)) and size <= 0:
            raise bad(f"{name} must be positive, got {size}" + (" (leave it out to take the input's size)"
                                                                  if from_input else ""))
    if from_input and (width == 0) != (height == 0):
        raise bad("give both width and height, or neither (to take the input's size)")

    seed = raw.get("seed")
    seed = default_seed(clip_id) if is_missing(seed) else integer_value(seed, "seed", 0, bad)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise bad(f"seed={seed} is outside {SEED_RANGE[0]}..{SEED_RANGE[1]}")
    steps = integer_value(raw.get("steps"), "steps", limits.default_steps, bad)
    guidance = number_value(raw.get("guidance"), "guidance", limits.default_guidance, bad)
    step_cache = raw.get("step_cache")
    step_cache = None if is_missing(step_cache) else number_value(step_cache, "step_cache", 0, bad)
    if step_cache is not None and step_cache < 0:
        raise bad(f"step_cache={step_cache:g} must be 0 or more (the step cache's threshold)")
    check_w, check_h = (width or limits.default_width), (height or limits.default_height)
    try:  # sizes, fps, steps, guidance: the model's own rules, with its nearest allowed values
        # a storyboard's shots are requests of their own, each on the grid (frames_for); their sum need not be
        # (on Wan, 4k+1 frames, two shots never are)
        check_frames = shots[0][1] if shots else frames
        limits.check(RenderRequest(prompt, check_w, check_h, check_frames, fps, seed, steps, guidance))
    except ValueError as e:
        raise bad(str(e)) from None

    return ClipSpec(i, clip_id, prompt, negative, width, height, frames, fps, seed, steps, guidance, mode, passthrough,
                    image=media.get("image", ""), image_end=media.get("image_end", ""),
                    video=media.get("video", ""), video_end=media.get("video_end", ""), direction=direction,
                    extension_only=flag_value(raw.get("extension_only"), "extension_only", bad),
                    strength=float(strength), shots=shots,
                    blur_faces=flag_value(raw.get("blur_faces"), "blur_faces", bad), lora=lora,
                    step_cache=step_cache)


def infer_mode(media: dict[str, str], shots: tuple, has_strength: bool) -> str:
    """The mode a row means when it names none: shots → storyboard; two keyframes or two clips →
    interpolate; an image → i2v; a video with a strength → remix; a video → extend; else t2v."""
    if shots:
        return "storyboard"
    if ("image" in media and "image_end" in media) or ("video" in media and "video_end" in media):
        return "interpolate"
    if "image" in media:
        return "i2v"
    if "video" in media:
        return "remix" if has_strength else "extend"
    return "t2v"


#: The media columns each mode reads (interpolate: one of two pairs).
MODE_MEDIA = {"t2v": (), "image": (), "storyboard": (), "i2v": ("image",), "extend": ("video",),
              "remix": ("video",), "interpolate": (("image", "image_end"), ("video", "video_end"))}


def _check_mode_columns(mode: str, media: dict[str, str], shots: tuple, has_strength: bool, bad) -> None:
    need = MODE_MEDIA[mode]
    if mode == "interpolate":
        pair = next((p for p in need if all(n in media for n in p)), None)
        if pair is None:
            raise bad("mode interpolate needs two keyframes (image and image_end) or two clips (video and video_end)")
        need = pair
    for name in need:
        if name not in media:
            raise bad(f"mode {mode} needs a URI in the {name!r} column")
    extra = sorted(set(media) - set(need))
    if extra:
        raise bad(f"mode {mode} does not use {', '.join(extra)}; drop the column value or set the mode that uses it")
    if shots and mode != "storyboard":
        raise bad(f"mode {mode} does not use shots; drop them or set mode=storyboard")
    if mode == "storyboard" and not shots:
        raise bad("mode storyboard needs shots: a list of {prompt, seconds}")
    if has_strength and mode != "remix":
        raise bad(f"mode {mode} does not use strength (only remix does)")
