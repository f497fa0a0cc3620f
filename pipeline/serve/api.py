"""`VideoAPI`, the ingress deployment: auth (the caller's owner id), job admission into the
durable store, the dispatcher that feeds the render deployment, deletes, and the replica's
metrics. Its HTTP routes are `pipeline.serve.http`."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from typing import Any

from ray import serve

from pipeline import storage
from pipeline.batch.manifest import ClipSpec
from pipeline.errors import UserError, one_line
from pipeline.media.decode import decode_image, probe_video
from pipeline.serve.config import ServeConfig, known_key
from pipeline.serve.errors import APIError
from pipeline.serve.http import build_api
from pipeline.serve.jobs_store import Job, JobStore, Rejected
from pipeline.serve.metrics import Metrics
from pipeline.serve.renderer import output_uris
from pipeline.serve.requests import (
    CREATE_FIELDS,
    EDIT_FIELDS,
    EXTEND_FIELDS,
    REMIX_FIELDS,
    adapters_in_roots,
    canonical_fields,
    check_unknown,
    clip_spec,
    extra_columns,
    image_type,
    new_video_id,
    reference_image,
    requested_fps,
    requested_seconds,
    requested_size,
    required_prompt,
    uploaded_video,
)

logger = logging.getLogger("reelforge.serve")

RENDER_ATTEMPTS = 3  # per job, when the render deployment (not the render) fails


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
        digest = known_key(key, self.cfg.api_key_sha256)
        if digest is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return digest[:24]

    # -- jobs ----------------------------------------------------------------------------------

    async def create(self, owner: str, fields: dict[str, Any]) -> Job:
        """POST /v1/videos: text→video; image→video with `input_reference`; a storyboard with `shots`.
        The length is `seconds` on the model's grid, or `frames` (vLLM-Omni's `num_frames`) itself."""
        fields = self._check_fields(fields, CREATE_FIELDS)
        video_id = new_video_id()
        size = requested_size(fields.get("size"), self.limits)
        for other in ("seconds", "frames"):
            if fields.get("shots") is not None and fields.get(other) is not None:
                raise APIError(400, f"give {other} or shots, not both: a storyboard is as long as its shots",
                               param="shots")
        if fields.get("frames") is not None and fields.get("seconds") is not None:
            raise APIError(400, "give seconds or frames, not both: frames is the clip's length itself",
                           param="frames", code="invalid_value")
        seconds = None
        if fields.get("shots") is None and fields.get("frames") is None:
            fps = requested_fps(fields.get("fps"), self.limits)
            seconds = requested_seconds(fields.get("seconds"), self.limits, fps)
        row = {"prompt": fields["prompt"], "shots": fields.get("shots"), **extra_columns(fields), "seconds": seconds,
               "frames": fields.get("frames"), "fps": fields.get("fps")}
        uploads = {}
        if fields.get("input_reference") is not None:
            data, ext, (w, h) = await asyncio.to_thread(self._reference_image, fields["input_reference"])
            row["mode"] = "i2v"
            row["image"] = storage.join(output_uris(self.cfg.out, video_id)["inputs"], f"input_reference{ext}")
            uploads[row["image"]] = data
            size = size or self.limits.fit_size(w, h)  # no size asked: the image's, on the model's grid
        if size:
            row["width"], row["height"] = size
        spec = await asyncio.to_thread(self._clip_spec, video_id, row)
        return await self._admit(owner, spec, f"{spec.frames / spec.fps:g}", uploads)

    async def remix(self, owner: str, source_id: str, fields: dict[str, Any]) -> Job:
        """POST /v1/videos/{id}/remix: the stored video re-sampled under a new prompt (SDEdit)."""
        fields = self._check_fields(fields, REMIX_FIELDS)
        return await self._from_video(owner, fields, {"id": source_id}, "remix", param="video_id")

    async def edit(self, owner: str, fields: dict[str, Any]) -> Job:
        """POST /v1/videos/edits: a remix of an uploaded or stored video."""
        fields = self._check_fields(fields, EDIT_FIELDS)
        return await self._from_video(owner, fields, fields.get("video"), "remix")

    async def extend(self, owner: str, fields: dict[str, Any]) -> Job:
        """POST /v1/videos/extensions: `seconds` more of an uploaded or stored video, after it (or
        before it, `direction` backward); the result is the whole clip unless `extension_only`."""
        fields = self._check_fields(fields, EXTEND_FIELDS)
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
            (w, h), seconds = requested_size(source.size, self.limits), float(source.seconds)
        else:
            uri, remixed_from = storage.join(output_uris(self.cfg.out, video_id)["inputs"], "video.mp4"), None
            try:
                w, h, seconds = await asyncio.to_thread(probe_video, data, param, "the uploaded video")
            except UserError as e:
                raise APIError(400, str(e), param=param, code="invalid_video_format") from None
            w, h = self.limits.fit_size(w, h)
        row = {"prompt": fields["prompt"], **extra_columns(fields), "mode": mode, "video": uri, "width": w, "height": h}
        if mode == "remix":
            longest = self.limits.max_frames / self.limits.default_fps
            if seconds > longest:
                raise APIError(400, f"{param}: the video is {seconds:g} s; a remix takes up to {longest:g} s",
                               param=param, code="invalid_value")
            row.update(seconds=max(seconds, self.limits.min_frames / self.limits.default_fps),
                       strength=fields.get("strength"))
            total = seconds
        else:
            added = requested_seconds(fields["seconds"], self.limits)
            row.update(seconds=added, direction=fields.get("direction"), extension_only=fields.get("extension_only"))
            total = added
        spec = await asyncio.to_thread(self._clip_spec, video_id, row)
        if mode == "extend" and not spec.extension_only:
            total += seconds
        return await self._admit(owner, spec, f"{total:g}", {uri: data} if data is not None else {},
                                 remixed_from=remixed_from)

    def _check_fields(self, fields: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
        """The request's fields under our names (vLLM-Omni's aliases resolved), checked: no unknown
        field, a prompt, this server's model."""
        fields = canonical_fields(fields, known)
        check_unknown(fields, known)
        required_prompt(fields)
        model = fields.get("model")
        if model is not None and model not in self.model_names:
            raise APIError(400, f"model {model!r} is not served here; this endpoint serves {self.model['name']!r}",
                           param="model", code="model_not_found")
        return fields

    def _clip_spec(self, video_id: str, row: dict[str, Any]) -> ClipSpec:
        """The request's validated clip, its adapters under the operator's LoRA roots; blocking (a
        LoRA file's real path and version are looked up): run it off the event loop."""
        row = {**row, "lora": adapters_in_roots(row.get("lora"), self.cfg.lora_roots)}
        return clip_spec(video_id, row, self.limits)

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
                                                     recaptioner=self.model["recaptioner"], dtype=self.cfg.dtype))
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
        from pipeline.batch.processor import clip_item

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
            self.metrics.batch_size.observe(last.get("batch", 1))
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

