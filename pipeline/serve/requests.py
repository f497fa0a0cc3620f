"""HTTP request fields → a validated clip: sizes, seconds, prompts, our extra fields, unknown
fields, reference images (uploaded, data URLs or fetched http(s) URLs, with a guard against
private addresses) and uploaded videos, checked when the request arrives. The clip itself is
validated exactly as a manifest row is (`pipeline.batch.manifest.validate`)."""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import json
import math
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import pyarrow as pa
from fsspec.core import split_protocol

from pipeline import storage
from pipeline.batch.manifest import JSON_COLUMNS_KEY, ClipSpec, validate
from pipeline.batch.row_fields import MAX_PROMPT_CHARS, check_unicode, lora_entries
from pipeline.errors import one_line
from pipeline.serve.config import ServeConfig
from pipeline.serve.errors import APIError

#: Our fields every render endpoint takes (sent by SDK users through `extra_body`).
EXTRA_FIELDS = ("seed", "steps", "guidance", "negative_prompt", "blur_faces", "lora", "step_cache")
#: vLLM-Omni's names for our fields, accepted wherever the field is (clients written for vLLM-Omni's
#: video API are the ones that exist): alias → our name.
FIELD_ALIASES = {"num_frames": "frames", "num_inference_steps": "steps", "guidance_scale": "guidance"}
#: The fields of each endpoint: OpenAI's, then ours (`frames`: the count itself, instead of `seconds`).
CREATE_FIELDS = ("prompt", "model", "seconds", "size", "input_reference", *EXTRA_FIELDS, "frames", "fps", "shots")
REMIX_FIELDS = ("prompt", "model", *EXTRA_FIELDS, "strength")
EDIT_FIELDS = ("prompt", "model", "video", *EXTRA_FIELDS, "strength")
EXTEND_FIELDS = ("prompt", "model", "seconds", "video", *EXTRA_FIELDS, "direction", "extension_only")
IMAGE_TYPES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff"}
SIZE_PATTERN = re.compile(r"(\d{1,5})x(\d{1,5})")


def _param_of(reason: str, given: dict[str, Any]) -> str | None:
    """Which request field a validation message is about (the messages start with the field name);
    a frame count the request did not give itself came from `seconds`."""
    head = re.match(r"[a-z_]+", reason)
    name = head.group(0) if head else ""
    if name in ("width", "height") or re.match(r"\d+x\d+ is", reason):
        return "size"
    if name == "frames" and given.get("frames") is None:
        return "seconds"
    return name if name in CREATE_FIELDS + REMIX_FIELDS + EXTEND_FIELDS else None


def requested_size(value: Any, limits) -> tuple[int, int] | None:
    """(width, height) of a `size` field; None when it is not given."""
    if value is None:
        return None
    m = SIZE_PATTERN.fullmatch(value.strip()) if isinstance(value, str) else None
    if not m:
        raise APIError(400, f"size must be a string WIDTHxHEIGHT, e.g. '{limits.default_width}x"
                            f"{limits.default_height}'; got {value!r}", param="size")
    return int(m.group(1)), int(m.group(2))


def clip_spec(video_id: str, row: dict[str, Any], limits) -> ClipSpec:
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
        raise APIError(400, reason, param=_param_of(reason, row), code="invalid_value")
    return specs[0]


def requested_seconds(value: Any, limits, fps: int | None = None) -> float:
    """The clip length asked for, which must fall on the model's frame grid at `fps` (None: the
    model's): seconds x fps a whole number of frame steps, rendered as `limits.frames_for` frames
    (the same count for the default model; one more for Wan's 4k+1, whose first frame stands on its
    own), or the length of an allowed count itself."""
    fps = fps or limits.default_fps
    step, offset = limits.frame_multiple, limits.frame_offset
    allowed = f"multiples of {step / fps:g} s up to {(limits.max_frames - offset) / fps:g} s"
    if value is None:
        return float(limits.default_seconds)
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError
        seconds = float(value)
    except ValueError:
        raise APIError(400, f"seconds must be a string holding a number of seconds ({allowed}), got {value!r}",
                       param="seconds") from None
    frames = seconds * fps if math.isfinite(seconds * fps) else -1  # 1e308 s x 8 fps overflows to inf
    rendered = limits.frames_for(seconds, fps) if frames > 0 else 0
    if frames <= 0 or frames != int(frames) or not 0 <= rendered - frames <= offset or rendered > limits.max_frames:
        grid = (f"frames in multiples of {step}" if not offset
                else f"{offset} + {step}k frames: N s renders N x {fps} + {offset}")
        raise APIError(400, f"seconds={value!r} is not a length this model renders: {allowed} "
                            f"(at {fps} fps, {grid})", param="seconds", code="invalid_value")
    return seconds


def requested_fps(value: Any, limits) -> int | None:
    """The fps a request gives, when it is a whole number in the model's range (None otherwise:
    `seconds` is then checked at the model's fps and the clip's validation names a bad fps)."""
    try:
        fps = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    except ValueError:
        return None
    return fps if fps is not None and limits.min_fps <= fps <= limits.max_fps else None


def canonical_fields(fields: dict[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    """`fields` with vLLM-Omni's names (`FIELD_ALIASES`) under ours, where the endpoint takes ours;
    APIError 400 naming both when a field and its alias are given with different values."""
    out = dict(fields)
    for alias, name in FIELD_ALIASES.items():
        if alias not in out or name not in known:
            continue
        value = out.pop(alias)
        if out.get(name) is not None and value is not None and not _same_value(out[name], value):
            raise APIError(400, f"{name}={out[name]!r} and {alias}={value!r} disagree: {alias} is another name for "
                                f"{name}; give one of them", param=alias, code="invalid_value")
        if out.get(name) is None:
            out[name] = value
    return out


def _same_value(a: Any, b: Any) -> bool:
    """Whether two values of one field agree, a form's "7" and JSON's 7 alike."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def required_prompt(fields: dict[str, Any], name: str = "prompt") -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, f"{name} is required: a non-empty string", param=name)
    if len(value) > MAX_PROMPT_CHARS:
        raise APIError(400, f"{name} is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}", param=name)
    check_unicode(value, name, lambda reason: APIError(400, reason, param=name, code="invalid_value"))
    return value


def extra_columns(fields: dict[str, Any]) -> dict[str, Any]:
    """Our extra fields every render endpoint takes, as manifest columns (None: not given)."""
    return {k: fields.get(k) for k in EXTRA_FIELDS}


def adapters_in_roots(value: Any, roots: tuple[str, ...]) -> Any:
    """A request's `lora` (a URI, {uri, scale}, a list of them, or its JSON text) with each URI
    resolved and checked to lie under one of the operator's `roots` (`ServeConfig.lora_roots`),
    before any file is looked up: a client must not make the server read (or report the existence
    of) files it was not meant to serve. A relative URI is taken under the first root. A local
    file's real path (symlinks and `..` resolved) must lie in a root's real path, and is what
    renders, so a link swapped in later cannot move it; an object-store URI must start with a
    root's prefix and hold no `.` or `..` segment (stores take them literally, fsspec may not).
    Blocking (realpath): call it off the event loop. Shapes the manifest refuses pass through
    unchanged for its own message. APIError 400 naming `lora` otherwise."""
    try:
        entries = lora_entries(value)
    except json.JSONDecodeError:
        return value
    if all(e is None or (isinstance(e, str) and not e.strip()) for e in entries):
        return value  # no adapter named
    if not roots:
        raise APIError(400, "lora: this server takes no LoRA adapters; start reel serve with --lora-root URI "
                            "(REELFORGE_LORA_ROOTS) naming where adapters may come from", param="lora")
    out = []
    for entry in entries:
        uri = entry.get("uri") if isinstance(entry, dict) else entry
        if isinstance(uri, str) and uri.strip():
            uri = _uri_in_roots(uri.strip(), roots)
            entry = {**entry, "uri": uri} if isinstance(entry, dict) else uri
        out.append(entry)
    return out


def _uri_in_roots(uri: str, roots: tuple[str, ...]) -> str:
    """`uri` resolved (see `adapters_in_roots`) when it lies under one of `roots`; APIError 400 otherwise."""
    if "://" not in uri and not uri.startswith("file:") and not os.path.isabs(uri):
        uri = os.path.join(roots[0], uri) if storage.is_local(roots[0]) else storage.join(roots[0], uri)
    if "::" in uri:  # a chained fsspec URL (simplecache::s3://…) names no single prefix
        pass
    elif storage.is_local(uri):
        path = os.path.realpath(os.path.abspath(split_protocol(uri)[1]))
        for root in filter(storage.is_local, roots):
            real_root = os.path.realpath(root)
            if os.path.commonpath([path, real_root]) == real_root:
                return path
    else:
        scheme, _, rest = uri.partition("://")
        normal = f"{scheme.lower()}://{rest}"
        if not {".", ".."} & set(urllib.parse.unquote(rest).split("/")):
            for root in roots:
                if not storage.is_local(root) and normal.startswith(root):
                    return normal
    raise APIError(400, f"lora: {uri} is not under a LoRA root this server allows ({', '.join(roots)}); "
                        "the operator adds roots with reel serve --lora-root URI (REELFORGE_LORA_ROOTS)",
                   param="lora", code="invalid_value")


def new_video_id() -> str:
    return "video_" + uuid.uuid4().hex


def check_unknown(fields: dict[str, Any], known: tuple[str, ...]) -> None:
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
    when it cannot be had.

    Each hop connects to the addresses that were checked, not to a second lookup of the name: a
    name answering a public address to the check and 127.0.0.1 to the connect (DNS rebinding)
    reaches nothing it should not. TLS still verifies the certificate against the host name.
    Proxies from the environment are not used: through a proxy the check would not hold.
    """
    for _ in range(max_redirects + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise APIError(400, f"{param}.image_url must be an http(s) URL", param=param)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, ValueError):
            raise APIError(400, f"{param}.image_url: cannot resolve host {parts.hostname!r}", param=param) from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not allow_private and any(not ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
            raise APIError(400, f"{param}.image_url points at a private or local address; pass the image as an "
                                "upload or a data URL", param=param, code="invalid_url")
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect,
                                             _PinnedHTTPHandler(addresses), _PinnedHTTPSHandler(addresses))
        try:
            with opener.open(urllib.request.Request(url, headers={"User-Agent": "reelforge"}), timeout=timeout_s) as r:
                data = r.read(max_bytes + 1)
        except urllib.error.HTTPError as e:
            if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                url = urllib.parse.urljoin(url, e.headers["Location"])
                continue
            raise APIError(400, f"{param}.image_url answered HTTP {e.code}", param=param) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise APIError(400, f"{param}.image_url cannot be fetched ({one_line(e, 200)})", param=param) from None
        if len(data) > max_bytes:
            raise APIError(400, f"{param}.image_url is larger than {max_bytes} bytes", param=param,
                           code="file_too_large")
        return data
    raise APIError(400, f"{param}.image_url redirects more than {max_redirects} times", param=param)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # each hop is resolved and checked by fetch_url, not followed blindly


def _pinned(connection_class: type, addresses: list[str]):
    """A factory of `connection_class` connections that open their socket to one of `addresses`
    (tried in order) whatever the host name says; the name still goes in Host, SNI and the
    certificate check."""
    def connection(host: str, **kwargs):
        conn = connection_class(host, **kwargs)

        def connect(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **options):
            error: OSError | None = None
            for ip in addresses:
                try:
                    return socket.create_connection((ip, address[1]), timeout, source_address, **options)
                except OSError as e:
                    error = e
            raise error or OSError("no address to connect to")

        conn._create_connection = connect
        return conn
    return connection


class _PinnedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, addresses: list[str]):
        super().__init__()
        self.addresses = addresses

    def http_open(self, req):
        return self.do_open(_pinned(http.client.HTTPConnection, self.addresses), req)


class _PinnedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, addresses: list[str]):
        super().__init__()
        self.addresses = addresses

    def https_open(self, req):
        return self.do_open(_pinned(http.client.HTTPSConnection, self.addresses), req,
                            context=self._context)


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
