"""The FastAPI app of a VideoAPI replica: every failure in OpenAI's error shape, bearer auth and
request metrics (a middleware), request bodies from JSON or forms, and the routes, each a call
into the replica (`pipeline.serve.api.VideoAPI`), which the app holds as `app.state.api`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.routing import Match

from pipeline import storage
from pipeline.errors import one_line
from pipeline.serve.errors import APIError, not_available
from pipeline.serve.jobs_store import Job
from pipeline.serve.renderer import output_uris
from pipeline.serve.requests import check_unknown, required_prompt
from pipeline.serve.schemas import (
    CREATE_SCHEMA,
    EDIT_SCHEMA,
    EXTEND_SCHEMA,
    REMIX_SCHEMA,
    add_bearer_security,
    body_schema,
)

logger = logging.getLogger("reelforge.serve")

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
CONTENT_TYPES = {"video": "video/mp4", "thumbnail": "image/jpeg", "spritesheet": "image/jpeg"}

#: The app's routes, (method, path, endpoint, options), in the order they are declared below.
_ROUTES: list[tuple[str, str, Callable, dict[str, Any]]] = []


def build_api(api) -> FastAPI:
    """The FastAPI app of one VideoAPI replica `api` (built at replica start, with the replica's state)."""
    app = FastAPI(title="reelforge", version="0.1.0", summary="OpenAI Videos API on reelforge",
                  openapi_tags=[{"name": "videos"}])
    app.state.api = api
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _unexpected)
    app.middleware("http")(auth_and_metrics)
    for method, path, endpoint, options in _ROUTES:
        app.add_api_route(path, endpoint, methods=[method], **options)
    add_bearer_security(app)
    return app


def replica_of(request: Request):
    """The VideoAPI replica serving `request`."""
    return request.app.state.api


def video_object(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "object": "video", "model": job.model, "status": job.status, "progress": job.progress,
        "created_at": job.created_at, "completed_at": job.completed_at, "expires_at": job.expires_at,
        "prompt": job.prompt, "seconds": job.seconds, "size": job.size, "error": job.error,
        "remixed_from_video_id": job.remixed_from_video_id,
    }


def poll_headers(request: Request) -> dict[str, str]:
    """The header telling clients how soon to poll a queued or in-progress video again."""
    return {"openai-poll-after-ms": str(replica_of(request).cfg.poll_after_ms)}


# -- errors and middleware -------------------------------------------------------------------


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _api_error(request: Request, e: APIError):
    return error_response(e)


async def _http_error(request: Request, e: HTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return error_response(APIError(e.status_code, str(e.detail), code=code))


async def _invalid(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body")]
    return error_response(APIError(400, f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}",
                                   param=loc[-1] if loc else None, code="invalid_value"))


async def _unexpected(request: Request, e: Exception):
    logger.exception("%s %s failed", request.method, request.url.path)
    return error_response(APIError(500, "The server had an error processing the request.", type="server_error"))


async def auth_and_metrics(request: Request, call_next):
    api = replica_of(request)
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
        route = next((r for r in request.app.routes if r.matches(request.scope)[0] == Match.FULL), None)
    return getattr(route, "path", "unmatched")


async def fields_of(request: Request) -> dict[str, Any]:
    """The body's fields, from JSON or a form; uploaded files as bytes; bounded in size."""
    cfg = replica_of(request).cfg
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
        holder, name = (fields.setdefault(nested.group(1), {}), nested.group(2)) if nested else (fields, key)
        if not isinstance(holder, dict) or name in holder:  # a second `prompt` would silently win
            raise APIError(400, f"the form gives {key!r} more than once; give each field once", param=key)
        holder[name] = value
    return fields


# -- routes ----------------------------------------------------------------------------------


def route(method: str, path: str, **options: Any):
    """Declare a route of the app `build_api` makes (FastAPI's route options)."""
    def declare(endpoint: Callable) -> Callable:
        _ROUTES.append((method, path, endpoint, options))
        return endpoint
    return declare


@route("POST", "/v1/videos", tags=["videos"], openapi_extra=body_schema(CREATE_SCHEMA))
async def create_video(request: Request):
    job = await replica_of(request).create(request.state.owner, await fields_of(request))
    return JSONResponse(video_object(job), headers=poll_headers(request))


@route("GET", "/v1/videos", tags=["videos"])
async def list_videos(request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100),
                      order: str = Query("desc", pattern="^(asc|desc)$")):
    try:
        jobs, more = replica_of(request).store.page(request.state.owner, after=after, limit=limit, order=order)
    except KeyError:
        raise APIError(400, f"after: no video with id '{after}'", param="after", code="invalid_value") from None
    data = [video_object(j) for j in jobs]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


@route("GET", "/v1/videos/{video_id}", tags=["videos"])
async def retrieve_video(request: Request, video_id: str):
    job = replica_of(request).job(request.state.owner, video_id)
    return JSONResponse(video_object(job),
                        headers=poll_headers(request) if job.status in ("queued", "in_progress") else {})


@route("DELETE", "/v1/videos/{video_id}", tags=["videos"])
async def delete_video(request: Request, video_id: str):
    replica_of(request).delete(request.state.owner, video_id)
    return {"id": video_id, "object": "video.deleted", "deleted": True}


@route("GET", "/v1/videos/{video_id}/content", tags=["videos"])
async def download_content(request: Request, video_id: str,
                           variant: str = Query("video", pattern="^(video|thumbnail|spritesheet)$")):
    api = replica_of(request)
    api.completed(request.state.owner, video_id)
    try:
        data = storage.read_bytes(output_uris(api.cfg.out, video_id)[variant])
    except FileNotFoundError:
        raise APIError(404, f"the {variant} of video '{video_id}' is no longer stored", param="variant",
                       code="not_found") from None
    filename = f'{video_id}.{"mp4" if variant == "video" else "jpg"}'
    return Response(data, media_type=CONTENT_TYPES[variant],
                    headers={"Content-Disposition": f'inline; filename="{filename}"'})


@route("POST", "/v1/videos/{video_id}/remix", tags=["videos"], openapi_extra=body_schema(REMIX_SCHEMA))
async def remix_video(request: Request, video_id: str):
    job = await replica_of(request).remix(request.state.owner, video_id, await fields_of(request))
    return JSONResponse(video_object(job), headers=poll_headers(request))


@route("POST", "/v1/videos/extensions", tags=["videos"], openapi_extra=body_schema(EXTEND_SCHEMA))
async def extend_video(request: Request):
    job = await replica_of(request).extend(request.state.owner, await fields_of(request))
    return JSONResponse(video_object(job), headers=poll_headers(request))


@route("POST", "/v1/videos/edits", tags=["videos"], openapi_extra=body_schema(EDIT_SCHEMA))
async def edit_video(request: Request):
    job = await replica_of(request).edit(request.state.owner, await fields_of(request))
    return JSONResponse(video_object(job), headers=poll_headers(request))


@route("POST", "/v1/videos/characters", tags=["videos"])
async def create_character(request: Request):
    fields = await fields_of(request)
    check_unknown(fields, ("name", "video"))
    required_prompt(fields, "name")
    if not isinstance(fields.get("video"), bytes):
        raise APIError(400, "video is required: an uploaded video file", param="video")
    raise not_available("characters", "the model has no character conditioning; describe the character in "
                                      "the prompt, or start from an image with input_reference")


@route("GET", "/metrics")
async def metrics(request: Request):
    api = replica_of(request)
    return Response(api.metrics.text(api.store.counts()), media_type="text/plain; version=0.0.4")


@route("GET", "/healthz")
async def healthz():
    return {"status": "ok"}


@route("GET", "/readyz")
async def readyz(request: Request):
    api = replica_of(request)
    try:
        api.store.ping()
    except Exception as e:
        raise APIError(503, f"job store unavailable: {one_line(e, 200)}", type="server_error") from None
    if not api.renderer_ready:
        raise APIError(503, "the render deployment is not ready yet", type="server_error")
    return {"status": "ready"}
