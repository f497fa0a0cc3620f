"""`reel gallery OUT`: the review gallery served by FastAPI over one run's output (any fsspec URI).

Routes (relative links only, so the app also works behind a path prefix):

    GET  /                               the page (read fresh: new clips and verdicts show on reload)
    GET  /files/{key}                    a clip's file by its key under OUT (videos/{id}.mp4, thumbnails/…,
                                         gallery/sprites/…), with HTTP range requests (seeking)
    GET  /api/clips                      the clip records as JSON (for scripts)
    GET  /api/clips/{id}/provenance      `reel verify`'s verdict on the clip's file
    POST /api/reviews                    {id, verdict, note?, reviewer?}: one verdict under OUT/reviews/
    GET|POST /login, POST /logout        off loopback: the `reel serve` keys, kept in an HttpOnly cookie

Off loopback every route but /login and /healthz needs a key: `Authorization: Bearer KEY` (scripts)
or the session cookie the login form sets (browsers). The key travels in a POST body once, never in
a URL; the cookie holds a random session token (in this process's memory), not the key.
"""

from __future__ import annotations

import getpass
import ipaddress
import json
import re
import secrets
import time
from typing import Any

from fastapi import FastAPI, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from pipeline import storage
from pipeline.errors import UsageError, one_line
from pipeline.gallery.clips import GalleryError, Run, ensure_sprite, load_run, provenance_summary
from pipeline.gallery.datasets import CachedDatasets
from pipeline.gallery.page import login_page, render_page
from pipeline.gallery.reviews import ReviewError, append_verdict

SESSION_COOKIE = "reel_gallery_session"
SESSION_SECONDS = 12 * 3600
MAX_RANGE_BYTES = 8 << 20  # an open-ended range ("bytes=0-") gets at most this much; the browser asks again
MEDIA_TYPES = {"mp4": "video/mp4", "mkv": "video/x-matroska", "png": "image/png", "jpg": "image/jpeg"}
FILE_KINDS = {"videos/": "media", "images/": "media", "thumbnails/": "thumbnail", "gallery/sprites/": "sprite"}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (then the gallery needs no key)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ranged_response(uri: str, range_header: str | None, media_type: str):
    """The file at `uri` (any fsspec URI), or the byte range a `Range: bytes=A-B` header asks for (206)."""
    fs, path = storage.resolve(uri)
    size = fs.size(path)
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-cache"}
    match = _RANGE.fullmatch((range_header or "").strip())
    if not match or not any(match.groups()):
        return Response(fs.cat_file(path), media_type=media_type, headers=headers)
    first, last = match.groups()
    start = int(first) if first else max(0, size - int(last))  # "bytes=-N": the last N bytes
    end = min(int(last) if first and last else size - 1, size - 1, start + MAX_RANGE_BYTES - 1)
    if start >= size or end < start:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    return Response(fs.cat_file(path, start=start, end=end + 1), status_code=206, media_type=media_type,
                    headers={**headers, "Content-Range": f"bytes {start}-{end}/{size}"})


class Gallery:
    """The state behind the routes: OUT, the run as last read, the accepted keys and the sessions."""

    def __init__(self, out: str, api_key_sha256: tuple[str, ...] = (), reviewer: str = ""):
        self.out = out
        self.api_key_sha256 = api_key_sha256
        self.reviewer = reviewer or getpass.getuser()
        self.sessions: dict[str, tuple[str, float]] = {}  # token → (owner: the key's hash, expiry)
        self.datasets = CachedDatasets()  # metadata/ and reviews/: a reload reads only new files
        self.run: Run = load_run(out, self.datasets.read)

    def reload(self) -> Run:
        self.run = load_run(self.out, self.datasets.read)
        return self.run

    def clip(self, clip_id: str) -> dict[str, Any] | None:
        return self.run.clip(clip_id) or self.reload().clip(clip_id)

    def owner_of_key(self, key: str) -> str | None:
        from pipeline.serve.config import known_key

        return known_key(key, self.api_key_sha256)

    def owner_of(self, cookie: str | None, authorization: str | None) -> str | None:
        """The caller's owner id (its key's hash) from the session cookie or a bearer key; None: unknown."""
        if cookie and (session := self.sessions.get(cookie)) and session[1] > time.time():
            return session[0]
        scheme, _, key = (authorization or "").partition(" ")
        return self.owner_of_key(key) if scheme.lower() == "bearer" and key.strip() else None

    def login(self, key: str) -> str | None:
        """A new session token for a known key; None for an unknown one."""
        owner = self.owner_of_key(key) if key.strip() else None
        if owner is None:
            return None
        token = secrets.token_urlsafe(32)
        self.sessions[token] = (owner, time.time() + SESSION_SECONDS)
        return token


def build_app(out: str, *, api_key_sha256: tuple[str, ...] = (), reviewer: str = ""):
    """The FastAPI app over OUT; with keys, every route but /login and /healthz needs one."""
    gallery = Gallery(out, api_key_sha256, reviewer)
    app = FastAPI(title="reelforge gallery", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gallery = gallery

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        if not gallery.api_key_sha256 or request.url.path in ("/login", "/healthz"):
            request.state.owner = None
            return await call_next(request)
        owner = gallery.owner_of(request.cookies.get(SESSION_COOKIE), request.headers.get("authorization"))
        if owner is None:
            if request.method == "GET" and request.url.path == "/":
                return RedirectResponse("login", status_code=303)
            return JSONResponse({"error": "log in at /login, or send 'Authorization: Bearer KEY'"}, status_code=401,
                                headers={"WWW-Authenticate": 'Bearer realm="reelforge gallery"'})
        request.state.owner = owner
        return await call_next(request)

    @app.exception_handler(HTTPException)
    async def one_line_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    def reviewer_of(request: Request) -> str:
        return f"key {request.state.owner[:8]}" if request.state.owner else gallery.reviewer

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request):
        return HTMLResponse(render_page(gallery.reload(), static=False, base="files/", reviewer=reviewer_of(request)))

    @app.get("/files/{key:path}")
    def file(key: str, request: Request):
        """A clip's file by its key under OUT; only the keys of the run's clips are served."""
        kind = next((k for prefix, k in FILE_KINDS.items() if key.startswith(prefix)), None)
        clip = gallery.clip(key.rsplit("/", 1)[-1].rsplit(".", 1)[0]) if kind else None
        if clip is None or clip[kind] != key:
            raise HTTPException(404, f"{key} is not a file of this gallery's clips")
        try:
            if kind == "sprite":
                return Response(ensure_sprite(out, clip), media_type="image/jpeg")
            return ranged_response(storage.join(out, key), request.headers.get("range"),
                                   MEDIA_TYPES.get(key.rsplit(".", 1)[-1], "application/octet-stream"))
        except FileNotFoundError:
            raise HTTPException(404, f"{key} is not under {out}") from None

    @app.get("/api/clips")
    def clips():
        return gallery.reload().clips

    @app.get("/api/clips/{clip_id}/provenance")
    def provenance(clip_id: str):
        clip = gallery.clip(clip_id)
        if clip is None:
            raise HTTPException(404, f"no clip {clip_id!r}")
        try:
            return provenance_summary(out, clip)
        except Exception as e:  # an unreadable file is the verdict, not a server error
            return {"error": one_line(e, 200)}

    @app.post("/api/reviews")
    async def review(request: Request):
        # JSON only: a page on another site can POST a form or text/plain here without asking (CSRF),
        # but not application/json
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPException(415, "send the verdict as application/json")
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise HTTPException(400, "the body must be a JSON object: {id, verdict, note?, reviewer?}")
        return await run_in_threadpool(record_verdict, body, reviewer_of(request))

    def record_verdict(body: dict[str, Any], reviewer: str) -> dict[str, Any]:
        clip_id = str(body.get("id") or "")
        if gallery.clip(clip_id) is None:
            raise HTTPException(404, f"no clip {clip_id!r} under {out}")
        try:
            row = append_verdict(out, clip_id, str(body.get("verdict") or ""), str(body.get("note") or ""),
                                 str(body.get("reviewer") or "").strip() or reviewer)
        except ReviewError as e:
            raise HTTPException(400, str(e)) from None
        return {**row, "time": row["time"].isoformat(timespec="seconds")}

    @app.get("/login", response_class=HTMLResponse)
    def login_form():
        return HTMLResponse(login_page())

    @app.post("/login")
    def login(request: Request, key: str = Form("")):
        token = gallery.login(key)
        if token is None:
            return HTMLResponse(login_page("That key is not one of this gallery's keys."), status_code=401)
        response = RedirectResponse("./", status_code=303)
        response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_SECONDS, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", path="/")
        return response

    @app.post("/logout")
    def logout(request: Request):
        gallery.sessions.pop(request.cookies.get(SESSION_COOKIE) or "", None)
        response = RedirectResponse("login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


def serve_gallery(out: str, *, host: str, port: int, api_key_sha256: tuple[str, ...] = ()) -> None:
    """`reel gallery OUT`: serve until interrupted. Off loopback a key is required (UsageError without)."""
    import uvicorn

    if not is_loopback(host) and not api_key_sha256:
        raise UsageError(f"--host {host} is reachable from other machines: set REEL_API_KEYS (comma-separated) "
                         "or pass --api-key-file, the keys `reel serve` takes")
    try:
        app = build_app(out, api_key_sha256=api_key_sha256 if not is_loopback(host) else ())
    except GalleryError as e:
        raise UsageError(str(e)) from None
    shown = f"[{host}]" if ":" in host else host
    print(f"reel gallery: {len(app.state.gallery.run.clips)} clips of {out} at http://{shown}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
