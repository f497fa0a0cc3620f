"""`reel serve`: the OpenAI Videos API on Ray Serve, rendering with the batch pipeline's code.

    HTTP ─ VideoAPI (FastAPI ingress, 1 replica)   auth, validation, durable jobs (SQLite), metrics
             │  dispatcher: one task per render slot, jobs in creation order
             └─ Renderer (N replicas, GPU or CPU)   recaption → render → MP4 + thumbnail + metadata
                                                    (RecaptionUDF / RenderUDF / ClipWriter rows)

A create is validated exactly as a manifest row is (`pipeline.batch.manifest.validate` against the
model's GridLimits), written to the job store, answered `queued`, and rendered by the same per-row
methods the Ray Data stages use, into the same layout as `reel render` under OUT (videos/{id}.mp4,
thumbnails/{id}.jpg, metadata/{id}.parquet; plus spritesheets/{id}.jpg for the API's spritesheet
variant). A job whose metadata already records its request hash is not rendered again, so jobs
taken up again after a restart never render twice.

Endpoints (paths, fields and status values of OpenAI's Videos API), each a generation mode of
the batch pipeline (`pipeline/stages/modes.py`):

    POST /v1/videos               text→video; image→video with `input_reference` (an uploaded
                                  image or {"image_url": https URL or data URL}); a storyboard
                                  with our `shots` extra field
    POST /v1/videos/{id}/remix    remix of a stored video under a new prompt (`strength` extra)
    POST /v1/videos/extensions    extend a video (uploaded, or {"id": …}) by `seconds`; extras
                                  `direction` (forward | backward) and `extension_only`
    POST /v1/videos/edits         remix of a video (uploaded, or {"id": …}) under a new prompt
    GET /v1/videos, GET|DELETE /v1/videos/{id}, GET /v1/videos/{id}/content?variant=
    video|thumbnail|spritesheet; /v1/videos/characters is validated, then refused (400
    `mode_not_available`: the model has no character conditioning).

Uploaded and fetched inputs are checked when the request arrives (type, size, decodability) and
stored under OUT/inputs/{id}/; the render reads them from there through the batch pipeline's
inputs stage, so the render replicas read only URIs the API wrote. An `image_url` on a private,
loopback or link-local address is refused unless `allow_private_urls` is set.
/healthz and /readyz need no key; everything else, /metrics included, a bearer key from
REEL_API_KEYS or the key file.

Configuration is `ServeConfig`: `reel serve` options, or REELFORGE_* environment variables for
the module-level `app` (`pipeline.serve.app:app`, what cluster/rayservice.yaml imports). Replica
counts, CPUs/GPUs per replica and autoscaling are fields of it, and a Serve config file's
`deployments:` section can override them per deployment (names `VideoAPI`, `Renderer`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import math
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.routing import Match

from pipeline import storage
from pipeline.errors import UserError, one_line
from pipeline.serve.jobs_store import Job, JobStore, Rejected
from pipeline.batch.manifest import JSON_COLUMNS_KEY, MAX_PROMPT_CHARS, ClipSpec, validate
from pipeline.media.decode import decode_image, probe_video

logger = logging.getLogger("reelforge.serve")

APP_NAME = "reelforge"
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
#: Our fields every render endpoint takes (sent by SDK users through `extra_body`).
EXTRA_FIELDS = ("seed", "steps", "guidance", "negative_prompt", "blur_faces")
#: The fields of each endpoint: OpenAI's, then ours.
CREATE_FIELDS = ("prompt", "model", "seconds", "size", "input_reference", *EXTRA_FIELDS, "shots")
REMIX_FIELDS = ("prompt", "model", *EXTRA_FIELDS, "strength")
EDIT_FIELDS = ("prompt", "model", "video", *EXTRA_FIELDS, "strength")
EXTEND_FIELDS = ("prompt", "model", "seconds", "video", *EXTRA_FIELDS, "direction", "extension_only")
IMAGE_TYPES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
CONTENT_TYPES = {"video": "video/mp4", "thumbnail": "image/jpeg", "spritesheet": "image/jpeg"}
SIZE_PATTERN = re.compile(r"(\d{1,5})x(\d{1,5})")
RENDER_ATTEMPTS = 3  # per job, when the render deployment (not the render) fails


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ServeConfig:
    """Everything the app is configured with. `api_key_sha256` holds hashes of the keys, so no
    key travels to (or is checkpointed by) the Serve controller."""

    model: str = "default"
    out: str = "renders/online"
    store: str | None = None  # SQLite file; None: OUT/.serve/jobs.sqlite (local OUT), else ~/.reelforge/
    recaptioner: str | None = None  # None: the model's own, else "plain"
    api_key_sha256: tuple[str, ...] = ()
    replicas: int = 1  # render replicas (fixed); ignored when max_replicas is set
    min_replicas: int | None = None  # with max_replicas: autoscale the render deployment
    max_replicas: int | None = None
    cpus_per_replica: float = 0.5
    gpus_per_replica: float = 0.0
    threads_per_replica: int | None = 1  # torch threads per render replica (None: torch's default)
    # One render replica over several devices (pipeline/stages/replica.py); None: the model config's `parallel`
    sp: int | None = None  # sequence-parallel ranks
    tp: int | None = None  # tensor-parallel ranks
    cfg_parallel: bool | None = None  # guidance's two passes on two ranks
    ingress_cpus: float = 0.1
    max_queued: int = 64  # jobs waiting for a render slot; beyond: 429
    max_inflight_per_key: int = 8  # queued + in-progress jobs per API key; beyond: 429
    max_upload_bytes: int = 10 << 20  # request bodies (input_reference uploads)
    poll_after_ms: int = 2000  # the openai-poll-after-ms header on queued / in-progress videos
    graceful_shutdown_s: float = 20.0
    allow_private_urls: bool = False  # fetch input_reference image_urls on private/loopback addresses
    fetch_timeout_s: float = 10.0  # an input_reference image_url must answer within this

    def __post_init__(self):
        # Replicas do not share this process's working directory: local paths become absolute.
        object.__setattr__(self, "out", storage.absolute(self.out))
        if self.store:
            object.__setattr__(self, "store", os.path.abspath(os.path.expanduser(self.store)))

    @property
    def store_path(self) -> str:
        if self.store:
            return self.store
        if storage.is_local(self.out):
            return os.path.join(self.out, ".serve", "jobs.sqlite")
        return os.path.expanduser("~/.reelforge/jobs.sqlite")

    def layout(self):
        """The render replica's parallel layout (`ParallelConfigError` when it cannot work)."""
        from pipeline.stages.replica import cfg_degree, replica_layout

        return replica_layout(self.model, sp=self.sp, tp=self.tp, cfg=cfg_degree(self.cfg_parallel))

    def recaptioner_for(self, model_recaptioner: str | None) -> str:
        """The recaptioner spec: the configured one, else the model's own, else "plain"."""
        return self.recaptioner or model_recaptioner or "plain"

    @property
    def render_slots(self) -> int:
        """Renders the dispatcher keeps in flight: one per (maximum) render replica."""
        return max(1, self.max_replicas or self.replicas)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> ServeConfig:
        """REELFORGE_<FIELD> variables (e.g. REELFORGE_MODEL, REELFORGE_OUT, REELFORGE_MAX_QUEUED),
        keys from REEL_API_KEYS (comma-separated) and REELFORGE_API_KEY_FILE; `overrides` win."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"REELFORGE_{f.name.upper()}")
            if raw is None or f.name == "api_key_sha256":
                continue
            kind = str(f.type)
            if kind.startswith("bool"):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
                continue
            values[f.name] = (int(raw) if "int" in kind else float(raw) if "float" in kind else raw) if raw != "" else None
        keys = [k.strip() for k in env.get("REEL_API_KEYS", "").split(",") if k.strip()]
        if env.get("REELFORGE_API_KEY_FILE"):
            keys += read_key_file(env["REELFORGE_API_KEY_FILE"])
        values["api_key_sha256"] = tuple(sorted({key_hash(k) for k in keys}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def read_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    text = storage.read_bytes(path).decode("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def not_available(mode: str, why: str, param: str | None = None) -> APIError:
    return APIError(400, f"{mode} is not available in this build: {why}", param=param, code="mode_not_available")


def _param_of(reason: str) -> str | None:
    """Which request field a validation message is about (the messages start with the field name)."""
    head = re.match(r"[a-z_]+", reason)
    name = head.group(0) if head else ""
    if name in ("width", "height") or re.match(r"\d+x\d+ is", reason):
        return "size"
    if name in ("frames", "seconds", "fps"):
        return "seconds"
    return name if name in CREATE_FIELDS + REMIX_FIELDS + EXTEND_FIELDS else None


# --------------------------------------------------------------------------------------------
# Requests → validated clips


def _size(value: Any, limits) -> tuple[int, int] | None:
    """(width, height) of a `size` field; None when it is not given."""
    if value is None:
        return None
    m = SIZE_PATTERN.fullmatch(value.strip()) if isinstance(value, str) else None
    if not m:
        raise APIError(400, f"size must be a string WIDTHxHEIGHT, e.g. '{limits.default_width}x"
                            f"{limits.default_height}'; got {value!r}", param="size")
    return int(m.group(1)), int(m.group(2))


def _clip_spec(video_id: str, row: dict[str, Any], limits) -> ClipSpec:
    """The validated clip of a request, given as a manifest row (None values left out), through
    the batch pipeline's own row validation; APIError 400 naming the field when it is refused."""
    row = {"id": video_id, **{k: v for k, v in row.items() if v is not None}}
    # Every value as JSON text in a column marked mixed: validation converts each value itself,
    # so "7" from a form field and 7 from JSON are checked alike, with the manifest's messages.
    table = pa.table({k: pa.array([json.dumps(v)], pa.string()) for k, v in row.items()})
    table = table.replace_schema_metadata({JSON_COLUMNS_KEY: json.dumps(list(row))})
    specs, errors = validate(table, limits)
    if errors:
        reason = errors[0].reason
        raise APIError(400, reason, param=_param_of(reason), code="invalid_value")
    return specs[0]


def _seconds(value: Any, limits) -> float:
    """The clip length asked for, which must fall on the model's frame grid at its fps."""
    fps, step = limits.default_fps, limits.frame_multiple
    allowed = f"multiples of {step / fps:g} s up to {limits.max_frames / fps:g} s"
    if value is None:
        return float(limits.default_seconds)
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError
        seconds = float(value)
    except ValueError:
        raise APIError(400, f"seconds must be a string holding a number of seconds ({allowed}), got {value!r}",
                       param="seconds") from None
    frames = seconds * fps if math.isfinite(seconds) else -1
    if frames <= 0 or frames != int(frames) or int(frames) % step or frames > limits.max_frames:
        raise APIError(400, f"seconds={value!r} is not a length this model renders: {allowed} "
                            f"(at {fps} fps, frames in multiples of {step})", param="seconds", code="invalid_value")
    return seconds


def _prompt(fields: dict[str, Any], name: str = "prompt") -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, f"{name} is required: a non-empty string", param=name)
    if len(value) > MAX_PROMPT_CHARS:
        raise APIError(400, f"{name} is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}", param=name)
    return value


def _extras(fields: dict[str, Any]) -> dict[str, Any]:
    """Our extra fields every render endpoint takes, as manifest columns (None: not given)."""
    return {k: fields.get(k) for k in EXTRA_FIELDS}


def new_video_id() -> str:
    return "video_" + uuid.uuid4().hex


def _check_unknown(fields: dict[str, Any], known: tuple[str, ...]) -> None:
    for name in fields:
        if name not in known:
            raise APIError(400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")


def image_type(data: bytes) -> str | None:
    """The MIME type of PNG, JPEG or WebP bytes by their magic numbers; None for anything else."""
    for mime, magic in IMAGE_TYPES.items():
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _check_image(data: bytes, param: str) -> None:
    if image_type(data) is None:
        raise APIError(400, f"{param} must be a PNG, JPEG or WebP image", param=param, code="invalid_image_format")


def reference_image(value: Any, param: str, cfg: ServeConfig) -> bytes:
    """The image bytes of an uploaded image or {"image_url": URL or data URL}, type-checked; an
    http(s) URL is fetched (blocking: call it off the event loop)."""
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, dict) and value.get("file_id") is not None and "image_url" not in value:
        raise APIError(400, f"{param}.file_id is not supported: this server has no Files API; upload the image "
                            "or pass image_url", param=param, code="unsupported_value")
    elif isinstance(value, dict) and set(value) <= {"image_url", "file_id"} and isinstance(value.get("image_url"), str):
        data = _image_url_bytes(value["image_url"], param, cfg)
    else:
        raise APIError(400, f"{param} must be an uploaded image file or an object with image_url", param=param)
    _check_image(data, param)
    return data


def _image_url_bytes(url: str, param: str, cfg: ServeConfig) -> bytes:
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if not head.endswith(";base64") or len(payload) > cfg.max_upload_bytes * 4 // 3 + 4:
            raise APIError(400, f"{param}.image_url must be a base64 data URL of at most {cfg.max_upload_bytes} bytes",
                           param=param)
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise APIError(400, f"{param}.image_url is not valid base64", param=param) from None
    if not url.startswith(("https://", "http://")):
        raise APIError(400, f"{param}.image_url must be an http(s) URL or a base64 data URL", param=param)
    return fetch_url(url, param, max_bytes=cfg.max_upload_bytes, timeout_s=cfg.fetch_timeout_s,
                     allow_private=cfg.allow_private_urls)


def fetch_url(url: str, param: str, *, max_bytes: int, timeout_s: float, allow_private: bool = False,
              max_redirects: int = 3) -> bytes:
    """GET an http(s) URL for a request field: at most `max_bytes`, within `timeout_s`, following
    up to `max_redirects` redirects; every hop's host must resolve to public addresses unless
    `allow_private` (a server fetching for clients must not reach its own network). APIError 400
    when it cannot be had."""
    import ipaddress
    import socket
    import urllib.error
    import urllib.parse
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # each hop is checked below, not followed blindly

    opener = urllib.request.build_opener(NoRedirect)
    for _ in range(max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise APIError(400, f"{param}.image_url must be an http(s) URL", param=param)
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, parts.port or 443)}
        except (socket.gaierror, UnicodeError):
            raise APIError(400, f"{param}.image_url: cannot resolve host {parts.hostname!r}", param=param) from None
        if not allow_private and any(not ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
            raise APIError(400, f"{param}.image_url points at a private or local address; pass the image as an "
                                "upload or a data URL", param=param, code="invalid_url")
        try:
            with opener.open(urllib.request.Request(url, headers={"User-Agent": "reelforge"}), timeout=timeout_s) as r:
                data = r.read(max_bytes + 1)
        except urllib.error.HTTPError as e:
            if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                url = urllib.parse.urljoin(url, e.headers["Location"])
                continue
            raise APIError(400, f"{param}.image_url answered HTTP {e.code}", param=param) from None
        except (urllib.error.URLError, OSError) as e:
            raise APIError(400, f"{param}.image_url cannot be fetched ({one_line(e, 200)})", param=param) from None
        if len(data) > max_bytes:
            raise APIError(400, f"{param}.image_url is larger than {max_bytes} bytes", param=param,
                           code="file_too_large")
        return data
    raise APIError(400, f"{param}.image_url redirects more than {max_redirects} times", param=param)


def uploaded_video(value: Any, param: str = "video") -> bytes | None:
    """An uploaded video's bytes (an MP4 by its ftyp box); None for a reference {"id": VIDEO_ID}."""
    if isinstance(value, (bytes, bytearray)):
        if bytes(value[4:8]) != b"ftyp":
            raise APIError(400, f"{param} must be an MP4 file", param=param, code="invalid_video_format")
        return bytes(value)
    if not isinstance(value, dict) or not isinstance(value.get("id"), str) or set(value) != {"id"}:
        raise APIError(400, f"{param} is required: an uploaded video file or an object {{\"id\": VIDEO_ID}}",
                       param=param)
    return None


# --------------------------------------------------------------------------------------------
# The render deployment


def spritesheet(frames: np.ndarray, tiles: int = 16, columns: int = 4) -> np.ndarray:
    """A grid of evenly spaced frames of a clip (T, H, W, 3), left to right, top to bottom."""
    from pipeline.media.contact_sheet import sheet

    columns = max(1, min(columns, len(frames)))
    count = max(columns, min(tiles, len(frames)) // columns * columns)
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    rows = [frames[picks[i:i + columns]] for i in range(0, count, columns)]
    return sheet(rows, frames=columns, scale=1)


def output_uris(out: str, video_id: str) -> dict[str, str]:
    """The batch layout's keys for a clip, plus the API's spritesheet and the folder of its uploaded inputs."""
    from pipeline.stages.udfs import output_keys

    return {**output_keys(out, video_id), "spritesheet": storage.join(out, "spritesheets", f"{video_id}.jpg"),
            "inputs": storage.join(out, "inputs", video_id)}


def recorded_clip(metadata_uri: str) -> dict[str, Any]:
    """The request hash and frame count a clip's metadata (written last) records; {} while there is none."""
    table = storage.read_parquet_dataset(metadata_uri, columns=["request_sha256", "frames"])
    return table.to_pylist()[0] if table is not None and table.num_rows else {}


@serve.deployment(name="Renderer", max_ongoing_requests=1)
class Renderer:
    """One render replica: the batch stages' per-row methods, called in sequence for one clip."""

    def __init__(self, cfg: ServeConfig):
        from pipeline.stages.udfs import ClipWriter, InputsUDF, RecaptionUDF, RenderUDF

        self.out = cfg.out
        self.renderer = RenderUDF(cfg.model, num_threads=cfg.threads_per_replica, parallel=cfg.layout())
        generator = self.renderer.generator
        self.recaptioner = RecaptionUDF(cfg.recaptioner_for(generator.config.recaptioner))
        self.inputs = InputsUDF(generator.limits)
        model = {"name": generator.info.name, "version": generator.info.version,
                 "weights_sha256": generator.info.weights_sha256}
        run_id = dt.datetime.now(dt.timezone.utc).strftime("serve-%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
        self.writer = ClipWriter(cfg.out, model, run_id)

    def ping(self) -> str:
        return self.writer.run_id

    def render(self, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Stream progress events for one clip. The last has progress 100 and either whether it
        rendered (False: its metadata already recorded the same request, nothing was done), with
        the clip's frame count, or `failed` {code, message}: refused by the safety gate, or an
        input that cannot be used (the user's to fix; anything else raises)."""
        from pipeline.media.encode import encode_jpeg
        from pipeline.stages.udfs import row_frames

        uris = output_uris(self.out, item["id"])
        recorded = recorded_clip(uris["metadata"])
        if recorded.get("request_sha256") == item["request_sha256"]:
            yield {"progress": 100, "rendered": False, "frames": recorded["frames"]}
            return
        yield {"progress": 5}
        self.recaptioner.recaption_row(item)
        if item.get("error"):  # the safety gate said no
            yield {"progress": 100, "failed": {"code": "moderation_blocked", "message": item["error"]}}
            return
        try:
            self.inputs.inputs_row(item)
        except UserError as e:
            yield {"progress": 100, "failed": {"code": "invalid_input", "message": one_line(e)}}
            return
        yield {"progress": 10}
        t0 = time.perf_counter()
        self.renderer.render_row(item)
        yield {"progress": 85}
        frames = row_frames(item)
        storage.write_bytes_atomic(uris["spritesheet"], encode_jpeg(spritesheet(frames)))
        self.writer.write(item, frames)  # metadata last: the clip is complete once it exists
        yield {"progress": 100, "rendered": True, "frames": len(frames), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """Prometheus metrics of one ingress replica, in a registry of its own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("reel_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=r)
        self.queued = Gauge("reel_queue_depth", "Videos queued for a render slot", registry=r)
        self.in_progress = Gauge("reel_videos_in_progress", "Videos rendering now", registry=r)
        self.render_seconds = Histogram("reel_render_seconds", "Seconds from render start to stored clip", registry=r,
                                        buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800))
        self.renders = Counter("reel_renders", "Jobs finished by the render deployment, by outcome",
                               ["outcome"], registry=r)
        self.failures = Counter("reel_render_failures", "Videos that failed to render", registry=r)
        self.rejections = Counter("reel_rejections", "Creates refused with 429, by reason", ["reason"], registry=r)

    def text(self, counts: dict[str, int]) -> bytes:
        from prometheus_client import generate_latest

        self.queued.set(counts["queued"])
        self.in_progress.set(counts["in_progress"])
        return generate_latest(self.registry)


# --------------------------------------------------------------------------------------------
# The ingress


def video_object(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "object": "video", "model": job.model, "status": job.status, "progress": job.progress,
        "created_at": job.created_at, "completed_at": job.completed_at, "expires_at": job.expires_at,
        "prompt": job.prompt, "seconds": job.seconds, "size": job.size, "error": job.error,
        "remixed_from_video_id": job.remixed_from_video_id,
    }


@serve.deployment(name="VideoAPI", num_replicas=1, max_ongoing_requests=256)
@serve.ingress()
class VideoAPI:
    """The HTTP API, the job store and the dispatcher that feeds the render deployment.

    One replica: the dispatcher and the SQLite store live here (see pipeline/serve/jobs_store.py for a
    deployment across nodes); it only validates, records and waits, so one replica serves many
    render replicas.
    """

    async def __init__(self, cfg: ServeConfig, renderer):
        from models.interface import describe_model

        info, self.limits, model_recaptioner = describe_model(cfg.model)
        self.cfg, self.renderer = cfg, renderer
        self.model = {"name": info.name, "weights_sha256": info.weights_sha256,
                      "recaptioner": cfg.recaptioner_for(model_recaptioner)}
        self.model_names = {cfg.model, info.name}
        self.recent_render_seconds: collections.deque[float] = collections.deque(maxlen=50)
        self.store = JobStore(cfg.store_path)
        self.metrics = Metrics()
        self.renderer_ready = False
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        for job in self.store.requeue_active():  # accepted before a restart: taken up again
            self.queue.put_nowait(job.id)
        self.tasks = [asyncio.create_task(self._worker()) for _ in range(cfg.render_slots)]
        self.tasks.append(asyncio.create_task(self._wait_for_renderer()))

    def __serve_build_asgi_app__(self):
        return build_api(self)

    # -- auth ----------------------------------------------------------------------------------

    def owner_of(self, authorization: str | None) -> str:
        """The caller's owner id (a hash of its key); APIError 401 unless the key is known."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.",
                           code="invalid_api_key")
        digest = key_hash(key.strip())
        if not any(hmac.compare_digest(digest, known) for known in self.cfg.api_key_sha256):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return digest[:24]

    # -- jobs ----------------------------------------------------------------------------------

    async def create(self, owner: str, fields: dict[str, Any]) -> Job:
        """POST /v1/videos: text→video; image→video with `input_reference`; a storyboard with `shots`."""
        self._check_fields(fields, CREATE_FIELDS)
        video_id = new_video_id()
        size = _size(fields.get("size"), self.limits)
        if fields.get("shots") is not None and fields.get("seconds") is not None:
            raise APIError(400, "give seconds or shots, not both: a storyboard is as long as its shots", param="shots")
        row = {"prompt": fields["prompt"], "shots": fields.get("shots"), **_extras(fields),
               "seconds": None if fields.get("shots") is not None else _seconds(fields.get("seconds"), self.limits)}
        uploads = {}
        if fields.get("input_reference") is not None:
            data, ext, (w, h) = await asyncio.to_thread(self._reference_image, fields["input_reference"])
            row["mode"] = "i2v"
            row["image"] = storage.join(output_uris(self.cfg.out, video_id)["inputs"], f"input_reference{ext}")
            uploads[row["image"]] = data
            size = size or self.limits.fit_size(w, h)  # no size asked: the image's, on the model's grid
        if size:
            row["width"], row["height"] = size
        spec = _clip_spec(video_id, row, self.limits)
        return await self._admit(owner, spec, f"{spec.frames / spec.fps:g}", uploads)

    async def remix(self, owner: str, source_id: str, fields: dict[str, Any]) -> Job:
        """POST /v1/videos/{id}/remix: the stored video re-sampled under a new prompt (SDEdit)."""
        self._check_fields(fields, REMIX_FIELDS)
        return await self._from_video(owner, fields, {"id": source_id}, "remix", param="video_id")

    async def edit(self, owner: str, fields: dict[str, Any]) -> Job:
        """POST /v1/videos/edits: a remix of an uploaded or stored video."""
        self._check_fields(fields, EDIT_FIELDS)
        return await self._from_video(owner, fields, fields.get("video"), "remix")

    async def extend(self, owner: str, fields: dict[str, Any]) -> Job:
        """POST /v1/videos/extensions: `seconds` more of an uploaded or stored video, after it (or
        before it, `direction` backward); the result is the whole clip unless `extension_only`."""
        self._check_fields(fields, EXTEND_FIELDS)
        if fields.get("seconds") is None:
            raise APIError(400, "seconds is required: how many seconds to add", param="seconds")
        return await self._from_video(owner, fields, fields.get("video"), "extend")

    async def _from_video(self, owner: str, fields: dict[str, Any], video: Any, mode: str,
                          param: str = "video") -> Job:
        """A remix or extension of `video` (an upload, or {"id": …} of a completed video of this owner)."""
        video_id = new_video_id()
        data = uploaded_video(video, param)
        if data is None:
            source = self.completed(owner, video["id"], param=param)
            uri, remixed_from = output_uris(self.cfg.out, source.id)["video"], source.id
            (w, h), seconds = _size(source.size, self.limits), float(source.seconds)
        else:
            uri, remixed_from = storage.join(output_uris(self.cfg.out, video_id)["inputs"], "video.mp4"), None
            try:
                w, h, seconds = await asyncio.to_thread(probe_video, data, param, "the uploaded video")
            except UserError as e:
                raise APIError(400, str(e), param=param, code="invalid_video_format") from None
            w, h = self.limits.fit_size(w, h)
        row = {"prompt": fields["prompt"], **_extras(fields), "mode": mode, "video": uri, "width": w, "height": h}
        if mode == "remix":
            longest = self.limits.max_frames / self.limits.default_fps
            if seconds > longest:
                raise APIError(400, f"{param}: the video is {seconds:g} s; a remix takes up to {longest:g} s",
                               param=param, code="invalid_value")
            row.update(seconds=max(seconds, self.limits.frame_multiple / self.limits.default_fps),
                       strength=fields.get("strength"))
            total = seconds
        else:
            added = _seconds(fields["seconds"], self.limits)
            row.update(seconds=added, direction=fields.get("direction"), extension_only=fields.get("extension_only"))
            total = added
        spec = _clip_spec(video_id, row, self.limits)
        if mode == "extend" and not spec.extension_only:
            total += seconds
        return await self._admit(owner, spec, f"{total:g}", {uri: data} if data is not None else {},
                                 remixed_from=remixed_from)

    def _check_fields(self, fields: dict[str, Any], known: tuple[str, ...]) -> None:
        _check_unknown(fields, known)
        _prompt(fields)
        model = fields.get("model")
        if model is not None and model not in self.model_names:
            raise APIError(400, f"model {model!r} is not served here; this endpoint serves {self.model['name']!r}",
                           param="model", code="model_not_found")

    def _reference_image(self, value: Any) -> tuple[bytes, str, tuple[int, int]]:
        """(bytes, file extension, (width, height)) of an input_reference; blocking (fetches, decodes)."""
        data = reference_image(value, "input_reference", self.cfg)
        try:
            image = decode_image(data, "input_reference", "the image")
        except UserError as e:
            raise APIError(400, str(e), param="input_reference", code="invalid_image_format") from None
        ext = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}[image_type(data)]
        return data, ext, (image.shape[1], image.shape[0])

    async def _admit(self, owner: str, spec: ClipSpec, seconds: str, uploads: dict[str, bytes],
                     remixed_from: str | None = None) -> Job:
        """Store the request's uploads, record the job (429 when the queue or the key's limit is
        full) and queue it."""
        values = {k: v for k, v in dataclasses.asdict(spec).items() if k != "passthrough"}
        job = Job(id=spec.id, owner=owner, model=self.model["name"], prompt=spec.prompt, seconds=seconds,
                  size=f"{spec.width}x{spec.height}", spec=values, remixed_from_video_id=remixed_from,
                  request_sha256=spec.request_sha256(model_sha256=self.model["weights_sha256"],
                                                     recaptioner=self.model["recaptioner"]))
        for uri, data in uploads.items():
            await asyncio.to_thread(storage.write_bytes_atomic, uri, data)
        try:
            self.store.admit(job, max_queued=self.cfg.max_queued, max_inflight_per_owner=self.cfg.max_inflight_per_key)
        except Rejected as e:
            if uploads:
                await asyncio.to_thread(storage.delete, output_uris(self.cfg.out, job.id)["inputs"], recursive=True)
            self.metrics.rejections.labels(reason=e.reason).inc()
            raise APIError(429, str(e), code="rate_limit_exceeded", type="requests",
                           headers={"Retry-After": str(self._retry_after())}) from None
        self.queue.put_nowait(job.id)
        return job

    def _retry_after(self) -> int:
        """Seconds until a render slot is likely free: the median of recent render times (5 before any)."""
        recent = sorted(self.recent_render_seconds)
        return min(600, max(1, math.ceil(recent[len(recent) // 2] if recent else 5)))

    def job(self, owner: str, video_id: str, param: str = "video_id") -> Job:
        job = self.store.get(video_id, owner)
        if job is None:
            raise APIError(404, f"No video found with id '{video_id}'.", param=param, code="not_found")
        return job

    def completed(self, owner: str, video_id: str, param: str = "video_id") -> Job:
        job = self.job(owner, video_id, param)
        if job.status != "completed":
            raise APIError(400, f"video '{video_id}' is {job.status}; this needs a completed video", param=param,
                           code="video_not_ready")
        return job

    def delete(self, owner: str, video_id: str) -> None:
        """Remove the job and its stored files; a job still rendering is removed too and its files
        are deleted when its render returns."""
        self.job(owner, video_id)
        self.store.delete(video_id)
        self._delete_outputs(video_id)

    def _delete_outputs(self, video_id: str) -> None:
        uris = output_uris(self.cfg.out, video_id)
        storage.delete(uris["metadata"])  # first: without it the clip no longer counts as rendered
        for kind in ("video", "thumbnail", "spritesheet"):
            storage.delete(uris[kind])
        storage.delete(uris["inputs"], recursive=True)

    # -- dispatcher ----------------------------------------------------------------------------

    async def _worker(self) -> None:
        while True:
            job_id = await self.queue.get()
            try:
                await self._run(job_id)
            except Exception:  # a bug here must not stop the dispatcher
                logger.exception("dispatching %s failed", job_id)

    async def _run(self, job_id: str) -> None:
        from pipeline.batch.driver import clip_item

        job = self.store.claim(job_id)
        if job is None:  # deleted while queued
            return
        item = clip_item(ClipSpec(**job.spec), job.request_sha256, b"")
        last: dict[str, Any] = {}
        for attempt in range(1, RENDER_ATTEMPTS + 1):
            try:
                async for event in self.renderer.options(stream=True).render.remote(item):
                    last = event
                    if event["progress"] < 100:
                        self.store.update(job_id, progress=event["progress"])
                break
            except Exception as e:
                from ray.exceptions import RayTaskError

                # The render itself raised (RayTaskError wraps it): the job fails. Anything else
                # is the deployment (a replica died, the app is going down): try again shortly,
                # and leave the job in progress meanwhile, so a restart takes it up again.
                if not isinstance(e, RayTaskError) and attempt < RENDER_ATTEMPTS:
                    await asyncio.sleep(2 ** attempt)
                    continue
                code = "render_failed" if isinstance(e, RayTaskError) else "render_unavailable"
                self._fail(job_id, {"code": code, "message": one_line(getattr(e, "cause", None) or e)})
                return
        if last.get("failed"):
            self._fail(job_id, last["failed"])
            return
        self.metrics.renders.labels(outcome="rendered" if last.get("rendered") else "already_rendered").inc()
        if last.get("rendered"):
            self.metrics.render_seconds.observe(last["seconds"])
            self.recent_render_seconds.append(last["seconds"])
        # The clip's length as rendered (an extension or edit of an upload is known exactly only now).
        seconds = {"seconds": f"{last['frames'] / job.spec['fps']:g}"} if last.get("frames") else {}
        if not self.store.update(job_id, status="completed", progress=100, completed_at=int(time.time()), **seconds):
            self._delete_outputs(job_id)  # deleted while it rendered

    def _fail(self, job_id: str, error: dict[str, str]) -> None:
        self.metrics.failures.inc()
        self.metrics.renders.labels(outcome="failed").inc()
        self.store.update(job_id, status="failed", progress=0, completed_at=int(time.time()), error=error)

    async def _wait_for_renderer(self) -> None:
        while not self.renderer_ready:
            try:
                await self.renderer.ping.remote()
                self.renderer_ready = True
            except Exception:
                await asyncio.sleep(1)


# --------------------------------------------------------------------------------------------
# HTTP


def build_api(api: VideoAPI):
    """The FastAPI app of one VideoAPI replica (built at replica start, with the replica's state)."""
    cfg = api.cfg
    app = FastAPI(title="reelforge", version="0.1.0", summary="OpenAI Videos API on reelforge",
                  openapi_tags=[{"name": "videos"}])
    poll = {"openai-poll-after-ms": str(cfg.poll_after_ms)}

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body")]
        return error_response(APIError(400, f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}",
                                       param=loc[-1] if loc else None, code="invalid_value"))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(APIError(500, "The server had an error processing the request.", type="server_error"))

    @app.middleware("http")
    async def auth_and_metrics(request: Request, call_next):
        try:
            if request.url.path not in OPEN_PATHS:
                request.state.owner = api.owner_of(request.headers.get("authorization"))
            response = await call_next(request)
        except APIError as e:
            response = error_response(e)
        if response.status_code == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="reelforge"'
        api.metrics.requests.labels(method=request.method, route=route_of(request),
                                    status=str(response.status_code)).inc()
        return response

    def route_of(request: Request) -> str:
        """The path template a request matched (also for requests refused before routing)."""
        route = request.scope.get("route")
        if route is None:
            route = next((r for r in app.routes if r.matches(request.scope)[0] == Match.FULL), None)
        return getattr(route, "path", "unmatched")

    async def fields_of(request: Request) -> dict[str, Any]:
        """The body's fields, from JSON or a form; uploaded files as bytes; bounded in size."""
        limit = cfg.max_upload_bytes + (64 << 10)
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body is {length} bytes; the limit is {limit}", code="request_too_large")
        body, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
            body.append(chunk)
        data = b"".join(body)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                fields = json.loads(data or b"null")
            except (ValueError, UnicodeDecodeError):
                raise APIError(400, "the request body is not valid JSON") from None
            if not isinstance(fields, dict):
                raise APIError(400, "the request body must be a JSON object")
            return fields
        if ctype not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            raise APIError(415, "send the request body as application/json or multipart/form-data",
                           code="unsupported_media_type")

        async def replay():
            return {"type": "http.request", "body": data, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=2, max_fields=64, max_part_size=1 << 20)
        except Exception as e:  # malformed multipart, too many parts
            raise APIError(400, f"the form body cannot be read: {one_line(e, 200)}") from None
        fields: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                value = await value.read(cfg.max_upload_bytes + 1)
                if len(value) > cfg.max_upload_bytes:
                    raise APIError(413, f"{key} is larger than {cfg.max_upload_bytes} bytes", param=key,
                                   code="file_too_large")
            nested = re.fullmatch(r"(\w+)\[(\w+)\]", key)  # input_reference[image_url]=… (the SDK's form)
            if nested:
                fields.setdefault(nested.group(1), {})[nested.group(2)] = value
            else:
                fields[key] = value
        return fields

    @app.post("/v1/videos", tags=["videos"], openapi_extra=_body_schema(_CREATE_SCHEMA))
    async def create_video(request: Request):
        job = await api.create(request.state.owner, await fields_of(request))
        return JSONResponse(video_object(job), headers=poll)

    @app.get("/v1/videos", tags=["videos"])
    async def list_videos(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                          order: str = Query("desc", pattern="^(asc|desc)$")):
        try:
            jobs, more = api.store.page(request.state.owner, after=after, limit=limit, order=order)
        except KeyError:
            raise APIError(400, f"after: no video with id '{after}'", param="after", code="invalid_value") from None
        data = [video_object(j) for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @app.get("/v1/videos/{video_id}", tags=["videos"])
    async def retrieve_video(request: Request, video_id: str):
        job = api.job(request.state.owner, video_id)
        return JSONResponse(video_object(job), headers=poll if job.status in ("queued", "in_progress") else {})

    @app.delete("/v1/videos/{video_id}", tags=["videos"])
    async def delete_video(request: Request, video_id: str):
        api.delete(request.state.owner, video_id)
        return {"id": video_id, "object": "video.deleted", "deleted": True}

    @app.get("/v1/videos/{video_id}/content", tags=["videos"])
    async def download_content(request: Request, video_id: str,
                               variant: str = Query("video", pattern="^(video|thumbnail|spritesheet)$")):
        api.completed(request.state.owner, video_id)
        try:
            data = storage.read_bytes(output_uris(cfg.out, video_id)[variant])
        except FileNotFoundError:
            raise APIError(404, f"the {variant} of video '{video_id}' is no longer stored", param="variant",
                           code="not_found") from None
        return Response(data, media_type=CONTENT_TYPES[variant],
                        headers={"Content-Disposition": f'inline; filename="{video_id}.{"mp4" if variant == "video" else "jpg"}"'})

    @app.post("/v1/videos/{video_id}/remix", tags=["videos"], openapi_extra=_body_schema(_REMIX_SCHEMA))
    async def remix_video(request: Request, video_id: str):
        job = await api.remix(request.state.owner, video_id, await fields_of(request))
        return JSONResponse(video_object(job), headers=poll)

    @app.post("/v1/videos/extensions", tags=["videos"], openapi_extra=_body_schema(_EXTEND_SCHEMA))
    async def extend_video(request: Request):
        job = await api.extend(request.state.owner, await fields_of(request))
        return JSONResponse(video_object(job), headers=poll)

    @app.post("/v1/videos/edits", tags=["videos"], openapi_extra=_body_schema(_EDIT_SCHEMA))
    async def edit_video(request: Request):
        job = await api.edit(request.state.owner, await fields_of(request))
        return JSONResponse(video_object(job), headers=poll)

    @app.post("/v1/videos/characters", tags=["videos"])
    async def create_character(request: Request):
        fields = await fields_of(request)
        _check_unknown(fields, ("name", "video"))
        _prompt(fields, "name")
        if not isinstance(fields.get("video"), bytes):
            raise APIError(400, "video is required: an uploaded video file", param="video")
        raise not_available("characters", "the model has no character conditioning; describe the character in "
                                          "the prompt, or start from an image with input_reference")

    @app.get("/metrics")
    async def metrics():
        return Response(api.metrics.text(api.store.counts()), media_type="text/plain; version=0.0.4")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        try:
            api.store.ping()
        except Exception as e:
            raise APIError(503, f"job store unavailable: {one_line(e, 200)}", type="server_error") from None
        if not api.renderer_ready:
            raise APIError(503, "the render deployment is not ready yet", type="server_error")
        return {"status": "ready"}

    _add_security(app)
    return app


_STR = {"type": "string"}
_EXTRA_PROPERTIES = {  # ours, through the SDK's extra_body
    "seed": {"type": "integer", "minimum": 0}, "steps": {"type": "integer", "minimum": 1},
    "guidance": {"type": "number", "minimum": 0}, "negative_prompt": _STR, "blur_faces": {"type": "boolean"}}
_PROMPT = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS}
_CREATE_SCHEMA = {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
    "prompt": _PROMPT, "model": _STR,
    "seconds": {"type": "string", "example": "2"}, "size": {"type": "string", "example": "64x64"},
    "input_reference": {"oneOf": [{"type": "string", "format": "binary"}, {
        "type": "object", "properties": {"image_url": _STR, "file_id": _STR}, "additionalProperties": False}]},
    **_EXTRA_PROPERTIES,
    "shots": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["prompt", "seconds"], "additionalProperties": False,
        "properties": {"prompt": _STR, "seconds": {"type": "number", "exclusiveMinimum": 0}}}}}}
_STRENGTH = {"strength": {"type": "number", "minimum": 0, "maximum": 1}}
_REMIX_SCHEMA = {"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": {
    "prompt": _PROMPT, "model": _STR, **_EXTRA_PROPERTIES, **_STRENGTH}}
_VIDEO_REF = {"oneOf": [{"type": "string", "format": "binary"},
                        {"type": "object", "required": ["id"], "properties": {"id": _STR}}]}
_EDIT_SCHEMA = {"type": "object", "required": ["prompt", "video"], "additionalProperties": False, "properties": {
    "prompt": _PROMPT, "model": _STR, "video": _VIDEO_REF, **_EXTRA_PROPERTIES, **_STRENGTH}}
_EXTEND_SCHEMA = {"type": "object", "required": ["prompt", "seconds", "video"], "additionalProperties": False,
                  "properties": {"prompt": _PROMPT, "model": _STR, "seconds": _STR, "video": _VIDEO_REF,
                                 **_EXTRA_PROPERTIES, "direction": {"type": "string", "enum": ["forward", "backward"]},
                                 "extension_only": {"type": "boolean"}}}


def _body_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A request body taken as JSON or as a form (uploads), as the SDKs send them."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}, "multipart/form-data": {"schema": schema}}}}


def _add_security(app) -> None:
    """Declare bearer auth in the OpenAPI document (clients and fuzzers read it from there)."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


# --------------------------------------------------------------------------------------------
# The application


def build_app(cfg: ServeConfig):
    """The bound Serve application: VideoAPI → Renderer, resources and replicas from `cfg` (binding
    reads the model's config for its parallel layout; the weights load in the replicas). A render
    replica over several ranks is deployed with a placement group: the replica in bundle 0, its
    rank actors in the others (`pipeline.stages.replica.replica_deployment_options`)."""
    from pipeline.stages.replica import replica_deployment_options

    scaling: dict[str, Any] = {"num_replicas": cfg.replicas}
    if cfg.max_replicas:
        scaling = {"autoscaling_config": {"min_replicas": cfg.min_replicas or 1, "max_replicas": cfg.max_replicas,
                                          "target_ongoing_requests": 1}}
    layout = cfg.layout()
    group, use_gpus = layout.world_size > 1, cfg.gpus_per_replica > 0
    resources = replica_deployment_options(
        cfg.model, layout, use_gpus=use_gpus, cpus_per_replica=None if group and use_gpus else cfg.cpus_per_replica,
        gpus_per_replica=None if group else cfg.gpus_per_replica)
    renderer = Renderer.options(**scaling, graceful_shutdown_timeout_s=cfg.graceful_shutdown_s, **resources).bind(cfg)
    return VideoAPI.options(ray_actor_options={"num_cpus": cfg.ingress_cpus}).bind(cfg, renderer)


def run(cfg: ServeConfig, *, host: str, port: int, address: str | None) -> None:
    """`reel serve`: start (or join) Ray, deploy the app on host:port and serve until interrupted."""
    from models.interface import describe_model
    from pipeline.prompt.recaption import check_recaptioner_spec
    from pipeline.batch.driver import check_output_reachable, init_ray
    from pipeline.errors import UsageError

    try:
        check_recaptioner_spec(cfg.recaptioner_for(describe_model(cfg.model)[2]))
        cfg.layout()
    except Exception as e:
        raise UsageError(f"cannot serve model {cfg.model!r}: {one_line(e)}") from None
    init_ray(address)
    check_output_reachable(cfg.out)

    def stop(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"reel serve: http://{host}:{port}/v1/videos  (model {cfg.model}, out {cfg.out}, "
              f"jobs {cfg.store_path}); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)  # accepted jobs stay in the store for the next start


#: The application RayService imports (cluster/rayservice.yaml), configured by REELFORGE_* variables.
app = build_app(ServeConfig.from_env())
