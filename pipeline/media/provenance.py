"""Provenance of every rendered output: MP4/PNG tags, a signed C2PA manifest, and `reel verify`.

The clip writer calls, in this order (the online endpoint uses the same writer):

    frames = embed_watermark(frames)                                  # pipeline/media/watermark.py
    record = Provenance.for_clip(gen.info, caption, seed=seed)
    data   = encode_mp4(frames, fps, metadata={"title": ..., "comment": caption, **record.tags()})
    data   = sign_c2pa(data, record)          # no-op unless REEL_C2PA_KEY and REEL_C2PA_CERT are set

and for one still (`image` mode): `data = sign_c2pa(pipeline.media.encode.encode_png(frame, record.tags()), record,
mime_type="image/png")`.

Tags (MP4 mdta keys, Matroska tags, PNG tEXt chunks): generator ("reelforge 0.1.0"), model,
model_version, model_sha256 (the weights' sha256), caption_sha256 (sha256 of the caption's UTF-8), seed
when given, and watermark (the scheme's name). `read_tags` reads them back from the moov/udta/meta boxes
(both the mdta key list ffmpeg writes with +use_metadata_tags and classic iTunes atoms), a Matroska
segment's Info title and file-wide SimpleTags (ffmpeg upper-cases their names; read back lower-cased,
the names they were written with), or PNG text chunks.

C2PA (c2pa-python): configured by the environment, read when signing:
  REEL_C2PA_KEY    PEM private key (path or fsspec URI)
  REEL_C2PA_CERT   PEM certificate chain, signer first then intermediates (path or fsspec URI). The
                   signer must be an end-entity certificate issued by a CA (c2pa rejects self-signed
                   ones), v3, keyUsage digitalSignature, extendedKeyUsage emailProtection or
                   documentSigning (id-kp 1.3.6.1.5.5.7.3.36) or the C2PA signing EKU.
  REEL_C2PA_ALG    es256 (default), es384, es512, ps256, ps384, ps512 or ed25519; must match the key
  REEL_C2PA_TSA_URL  a timestamp authority; none by default (nothing outside may be reachable)
  REEL_C2PA_TRUST_ANCHORS  PEM CA certificates that `reel verify` trusts (path or URI); without it a
                   valid manifest reads "Valid" (signature and hashes good, signer not on a trust list)
                   rather than "Trusted".
The manifest holds the claim generator (reelforge + version), a c2pa.actions assertion with
c2pa.created and digitalSourceType trainedAlgorithmicMedia, and an org.reelforge.generation
assertion with the model's name/version/weights sha256, the caption sha256, the seed and the
watermark scheme. A signed file is *not* byte-reproducible (the manifest carries a fresh instance
id, a signing time and an ECDSA signature); the frames and the unsigned MP4 are. c2pa has no Matroska
support (neither to sign nor to read), so an FFV1 master carries the watermark and tags only.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from pipeline.errors import UserError, one_line
from pipeline.media.watermark import SCHEME as WATERMARK_SCHEME

__all__ = ["Provenance", "C2paConfig", "ProvenanceError", "UnreadableInput", "provenance_tags", "caption_sha256",
           "read_tags", "c2pa_config_from_env", "sign_c2pa", "read_c2pa", "read_provenance",
           "format_report", "GENERATOR", "WATERMARK_SCHEME", "TRAINED_ALGORITHMIC_MEDIA"]

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
ASSERTION_LABEL = "org.reelforge.generation"
_ALGS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")
_MIME = {"mp4": "video/mp4", "mkv": "video/x-matroska", "png": "image/png", "jpeg": "image/jpeg"}
#: the formats c2pa embeds manifests in and reads them from (not Matroska)
C2PA_FORMATS = ("mp4", "png", "jpeg")


class ProvenanceError(UserError):
    """Signing is configured but cannot work (bad key, certificate or algorithm); one line, what to do."""

    show_type = True


class UnreadableInput(UserError):
    """The file cannot be read, or is not an MP4, Matroska, PNG or JPEG file."""

    show_type = True


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("reelforge")
    except Exception:  # not installed (a source checkout): still say which code made it
        return "0+unknown"


GENERATOR = f"reelforge {_version()}"


def caption_sha256(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Provenance:
    """What an output says about where it came from. `model_*` from the generator's ModelInfo."""

    model: str
    model_version: str
    model_sha256: str
    caption_sha256: str
    seed: int | None = None
    generator: str = GENERATOR
    watermark: str | None = WATERMARK_SCHEME
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_clip(cls, info: Any, caption: str, *, seed: int | None = None, watermarked: bool = True,
                 extra: dict[str, str] | None = None) -> Provenance:
        """From a `models.interface.ModelInfo` (or any object/dict with name, version, weights_sha256)."""
        get = info.get if isinstance(info, dict) else (lambda k: getattr(info, k))
        return cls(model=str(get("name")), model_version=str(get("version")), model_sha256=str(get("weights_sha256")),
                   caption_sha256=caption_sha256(caption), seed=None if seed is None else int(seed),
                   watermark=WATERMARK_SCHEME if watermarked else None, extra=dict(extra or {}))

    def tags(self) -> dict[str, str]:
        """Container tags (keys valid for `encode_mp4(metadata=...)` and PNG text chunks)."""
        tags = {"generator": self.generator, "model": self.model, "model_version": self.model_version,
                "model_sha256": self.model_sha256, "caption_sha256": self.caption_sha256}
        if self.seed is not None:
            tags["seed"] = str(self.seed)
        if self.watermark:
            tags["watermark"] = self.watermark
        tags.update({k: str(v) for k, v in self.extra.items()})
        return tags

    def manifest(self, *, title: str | None = None, mime_type: str = "video/mp4") -> dict:
        """The C2PA manifest definition (for c2pa.Builder)."""
        name, _, version = self.generator.partition(" ")
        data: dict[str, Any] = {"model": {"name": self.model, "version": self.model_version,
                                          "weights_sha256": self.model_sha256},
                                "caption_sha256": self.caption_sha256}
        if self.seed is not None:
            data["seed"] = self.seed
        if self.watermark:
            data["watermark"] = self.watermark
        if self.extra:
            data["extra"] = dict(self.extra)
        return {
            "claim_generator_info": [{"name": name, "version": version or "unknown"}],
            "title": title or ("clip.mp4" if mime_type == "video/mp4" else "image"),
            "format": mime_type,
            "assertions": [
                {"label": "c2pa.actions", "data": {"actions": [{
                    "action": "c2pa.created",
                    "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                    "softwareAgent": {"name": name, "version": version or "unknown"},
                    "parameters": {"model": f"{self.model} {self.model_version}"},
                }]}},
                {"label": ASSERTION_LABEL, "data": data},
            ],
        }


def provenance_tags(info: Any, caption: str, *, seed: int | None = None, watermarked: bool = True) -> dict[str, str]:
    """Shortcut: `Provenance.for_clip(info, caption, seed=seed).tags()`."""
    return Provenance.for_clip(info, caption, seed=seed, watermarked=watermarked).tags()


# --------------------------------------------------------------------------------------------
# Stills


# --------------------------------------------------------------------------------------------
# Reading tags back

_ITUNES = {b"\xa9nam": "title", b"\xa9cmt": "comment", b"\xa9ART": "artist", b"\xa9alb": "album",
           b"\xa9day": "date", b"\xa9gen": "genre", b"\xa9too": "encoder", b"desc": "description",
           b"cprt": "copyright", b"ldes": "synopsis", b"keyw": "keywords", b"\xa9grp": "grouping"}


def _boxes(data: bytes, start: int, end: int):
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        head = 8
        if size == 1:
            if pos + 16 > end:
                return
            size, head = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            return
        yield kind, pos + head, pos + size
        pos += size


def _child(data: bytes, start: int, end: int, kind: bytes):
    return next(((s, e) for k, s, e in _boxes(data, start, end) if k == kind), None)


def _data_value(data: bytes, start: int, end: int) -> str | None:
    box = _child(data, start, end, b"data")
    if box is None or box[1] - box[0] < 8:
        return None
    return data[box[0] + 8:box[1]].decode("utf-8", "replace")  # skip type indicator and locale


def _mp4_tags(data: bytes) -> dict[str, str]:
    tags: dict[str, str] = {}
    moov = _child(data, 0, len(data), b"moov")
    udta = moov and _child(data, *moov, b"udta")
    meta = udta and _child(data, *udta, b"meta")
    if not meta:
        return tags
    start, end = meta[0] + 4, meta[1]  # meta is a full box: version and flags first
    keys: list[str] = []
    k = _child(data, start, end, b"keys")
    if k:
        count = struct.unpack(">I", data[k[0] + 4:k[0] + 8])[0]
        pos = k[0] + 8
        for _ in range(count):
            if pos + 8 > k[1]:
                break
            size = struct.unpack(">I", data[pos:pos + 4])[0]
            keys.append(data[pos + 8:pos + size].decode("utf-8", "replace"))
            pos += max(size, 8)
    ilst = _child(data, start, end, b"ilst")
    for kind, s, e in (_boxes(data, *ilst) if ilst else ()):
        value = _data_value(data, s, e)
        if value is None:
            continue
        if keys and kind[:2] == b"\x00\x00":
            index = struct.unpack(">I", kind)[0]
            if 1 <= index <= len(keys):
                tags[keys[index - 1]] = value
        else:
            tags[_ITUNES.get(kind, kind.decode("latin-1"))] = value
    return tags


# Matroska (EBML) element ids: the segment, its Info and Title, its Tags and their parts
_EBML, _SEGMENT, _INFO, _TITLE = 0x1A45DFA3, 0x18538067, 0x1549A966, 0x7BA9
_TAGS, _TAG, _TARGETS, _SIMPLE_TAG, _TAG_NAME, _TAG_STRING = 0x1254C367, 0x7373, 0x63C0, 0x67C8, 0x45A3, 0x4487
_TARGET_UIDS = frozenset({0x63C5, 0x63C9, 0x63C4, 0x63C6})  # a tag of a track, edition, chapter, attachment


def _ebml_vint(data: bytes, pos: int, end: int, keep_marker: bool) -> tuple[int, int] | None:
    """(value, next position) of the variable-length integer at `pos`; an element id keeps its length
    marker, a size drops it (all ones: unknown, returned as -1). None when it runs past `end`."""
    if pos >= end or data[pos] == 0:
        return None
    length = 9 - data[pos].bit_length()
    if pos + length > end:
        return None
    value = int.from_bytes(data[pos:pos + length], "big")
    if keep_marker:
        return value, pos + length
    value &= (1 << (7 * length)) - 1
    return (-1 if value == (1 << (7 * length)) - 1 else value), pos + length


def _ebml_elements(data: bytes, start: int, end: int):
    """(id, start, end) of each EBML element in data[start:end]; an unknown size runs to `end`. Stops at
    a truncated element."""
    pos = start
    while pos < end:
        head = _ebml_vint(data, pos, end, keep_marker=True)
        size = head and _ebml_vint(data, head[1], end, keep_marker=False)
        if not size:
            return
        body = size[1]
        stop = end if size[0] < 0 else body + size[0]
        if stop > end:
            return
        yield head[0], body, stop
        pos = stop


def _mkv_tags(data: bytes) -> dict[str, str]:
    tags: dict[str, str] = {}
    segment = next(((s, e) for k, s, e in _ebml_elements(data, 0, len(data)) if k == _SEGMENT), None)
    for kind, start, end in _ebml_elements(data, *segment) if segment else ():
        if kind == _INFO:
            for k, s, e in _ebml_elements(data, start, end):
                if k == _TITLE:
                    tags["title"] = data[s:e].decode("utf-8", "replace")
        elif kind == _TAGS:
            for tag in (t for t in _ebml_elements(data, start, end) if t[0] == _TAG):
                parts = list(_ebml_elements(data, tag[1], tag[2]))
                targets = [(s, e) for k, s, e in parts if k == _TARGETS]
                if any(k in _TARGET_UIDS for s, e in targets for k, _, _ in _ebml_elements(data, s, e)):
                    continue  # a track's own tags (ffmpeg's ENCODER, DURATION), not the file's
                for k, s, e in parts:
                    if k != _SIMPLE_TAG:
                        continue
                    fields = {fk: data[fs:fe].decode("utf-8", "replace") for fk, fs, fe in _ebml_elements(data, s, e)}
                    if _TAG_NAME in fields and _TAG_STRING in fields:
                        tags[fields[_TAG_NAME].lower()] = fields[_TAG_STRING]
    return tags


def _png_tags(data: bytes) -> dict[str, str]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return {str(k): str(v) for k, v in getattr(im, "text", {}).items()}


def _sniff(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"uuid"):
        return "mp4"
    if int.from_bytes(data[:4], "big") == _EBML:
        return "mkv"
    raise UnreadableInput("not an MP4, Matroska, PNG or JPEG file")


def read_tags(data: bytes) -> dict[str, str]:
    """Container tags of MP4 (moov/udta/meta), Matroska (segment title and tags) or PNG (text chunks)
    bytes; {} for JPEG."""
    kind = _sniff(data)
    if kind == "mp4":
        return _mp4_tags(data)
    if kind == "mkv":
        return _mkv_tags(data)
    if kind == "png":
        return _png_tags(data)
    return {}


# --------------------------------------------------------------------------------------------
# C2PA


@dataclass(frozen=True)
class C2paConfig:
    key: str             # path or fsspec URI of a PEM private key
    cert: str            # path or fsspec URI of the PEM chain, signer first
    alg: str = "es256"
    tsa_url: str | None = None


def c2pa_config_from_env(env: dict[str, str] | None = None) -> C2paConfig | None:
    """The signing configuration from REEL_C2PA_*; None when neither key nor certificate is set."""
    env = os.environ if env is None else env
    key, cert = env.get("REEL_C2PA_KEY", "").strip(), env.get("REEL_C2PA_CERT", "").strip()
    if not key and not cert:
        return None
    if not key or not cert:
        missing = "REEL_C2PA_KEY" if not key else "REEL_C2PA_CERT"
        raise ProvenanceError(f"C2PA signing needs both REEL_C2PA_KEY and REEL_C2PA_CERT; set {missing} "
                              "(or unset both to write unsigned outputs)")
    alg = (env.get("REEL_C2PA_ALG") or "es256").strip().lower()
    if alg not in _ALGS:
        raise ProvenanceError(f"REEL_C2PA_ALG={alg!r} is not one of {', '.join(_ALGS)}")
    return C2paConfig(key=key, cert=cert, alg=alg, tsa_url=(env.get("REEL_C2PA_TSA_URL") or "").strip() or None)


def _read_uri(uri: str, what: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except Exception as e:
        raise ProvenanceError(f"cannot read the C2PA {what} at {uri!r} ({type(e).__name__}: {e}); "
                              f"check REEL_C2PA_{what.upper()}") from None


@lru_cache(maxsize=4)
def _credentials(config: C2paConfig) -> tuple[bytes, bytes]:
    key, cert = _read_uri(config.key, "key"), _read_uri(config.cert, "cert")
    if b"PRIVATE KEY-----" not in key:
        raise ProvenanceError(f"REEL_C2PA_KEY={config.key!r} is not a PEM private key")
    if b"-----BEGIN CERTIFICATE-----" not in cert:
        raise ProvenanceError(f"REEL_C2PA_CERT={config.cert!r} is not a PEM certificate chain")
    return key, cert


def sign_c2pa(data: bytes, provenance: Provenance, *, mime_type: str = "video/mp4", title: str | None = None,
              config: C2paConfig | None = None) -> bytes:
    """`data` (MP4, PNG or JPEG bytes) with a signed C2PA manifest embedded; `data` unchanged when
    signing is not configured (no `config` and no REEL_C2PA_KEY/REEL_C2PA_CERT). Raises
    ProvenanceError (one line) when it is configured but cannot sign."""
    config = config or c2pa_config_from_env()
    if config is None:
        return data
    try:
        import c2pa
    except ImportError:
        raise ProvenanceError("C2PA signing is configured (REEL_C2PA_KEY) but c2pa-python is not installed: "
                              "pip install c2pa-python") from None
    key, cert = _credentials(config)
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(config.alg, cert, key, config.tsa_url))
    except Exception as e:
        reason = one_line(e, limit=None, show_type=False)
        raise ProvenanceError(f"C2PA signer rejected REEL_C2PA_KEY/REEL_C2PA_CERT with alg {config.alg}: "
                              f"{reason}; the key must match the certificate and REEL_C2PA_ALG") from None
    settings = {"builder": {"thumbnail": {"enabled": False}}}
    try:
        with signer, c2pa.Context.from_dict(settings) as ctx, \
                c2pa.Builder(json.dumps(provenance.manifest(title=title, mime_type=mime_type)), ctx) as builder:
            out = io.BytesIO()
            builder.sign(signer, mime_type, io.BytesIO(data), out)
            return out.getvalue()
    except Exception as e:
        reason = one_line(e, limit=None, show_type=False)
        raise ProvenanceError(
            f"C2PA signing failed: {reason}; REEL_C2PA_CERT must be the signer's certificate (issued by a CA, "
            "not self-signed, with the emailProtection or documentSigning EKU) followed by its intermediates") from None


def _trust_settings() -> dict:
    uri = os.environ.get("REEL_C2PA_TRUST_ANCHORS", "").strip()
    if not uri:
        return {}
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            anchors = f.read().decode("ascii")
    except Exception as e:
        raise ProvenanceError(f"cannot read REEL_C2PA_TRUST_ANCHORS={uri!r}: {type(e).__name__}: {e}") from None
    return {"trust": {"trust_anchors": anchors}, "verify": {"verify_trust": True}}


def read_c2pa(data: bytes, mime_type: str | None = None) -> dict | None:
    """The active C2PA manifest of MP4/PNG/JPEG bytes, summarised; None when there is none.

    Keys: state ("Trusted", "Valid" or "Invalid"), valid (signature and hashes good), trusted,
    signer (issuer, common_name, alg, time), claim_generator, actions, generation (the reelforge
    assertion), failures (codes other than an untrusted signer).
    """
    try:
        import c2pa
    except ImportError:
        return {"state": "unknown", "valid": False, "error": "c2pa-python is not installed: pip install c2pa-python"}
    mime_type = mime_type or _MIME[_sniff(data)]
    settings = _trust_settings() or {"verify": {"verify_trust": True}}
    try:
        with c2pa.Context.from_dict(settings) as ctx:
            reader = c2pa.Reader.try_create(mime_type, io.BytesIO(data), None, ctx)
            if reader is None:
                return None
            with reader:
                store = json.loads(reader.json())
                state = reader.get_validation_state()
    except Exception as e:  # c2pa.C2paError and its kin: a manifest is there but cannot be read
        reason = one_line(e, limit=None, show_type=False)[:300]
        return {"state": "Invalid", "valid": False, "trusted": False, "error": reason}
    active = store.get("manifests", {}).get(store.get("active_manifest") or "", {})
    results = (store.get("validation_results") or {}).get("activeManifest") or {}
    failures = [f.get("code") for f in results.get("failure", []) if f.get("code")]
    serious = [c for c in failures if c != "signingCredential.untrusted"]
    assertions = {a.get("label"): a.get("data") for a in active.get("assertions", [])}
    actions = (assertions.get("c2pa.actions.v2") or assertions.get("c2pa.actions") or {}).get("actions", [])
    sig = active.get("signature_info") or {}
    return {
        "state": state,
        "valid": state in ("Valid", "Trusted") and not serious,
        "trusted": state == "Trusted",
        "signer": {k: sig.get(k) for k in ("issuer", "common_name", "alg", "time") if sig.get(k)},
        "claim_generator": [f"{g.get('name')} {g.get('version', '')}".strip()
                            for g in active.get("claim_generator_info", [])],
        "actions": [{"action": a.get("action"), "digitalSourceType": a.get("digitalSourceType")} for a in actions],
        "generation": assertions.get(ASSERTION_LABEL),
        "failures": serious,
    }


# --------------------------------------------------------------------------------------------
# Verify


def _load(path_or_bytes: str | os.PathLike | bytes) -> tuple[str, bytes]:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return "<bytes>", bytes(path_or_bytes)
    name = os.fspath(path_or_bytes)
    import fsspec

    try:
        with fsspec.open(name, "rb") as f:
            return name, f.read()
    except Exception as e:
        raise UnreadableInput(f"cannot read {name}: {one_line(e, limit=None, show_type=True)}") from None


def _frames(kind: str, data: bytes) -> np.ndarray:
    if kind in ("mp4", "mkv"):
        from pipeline.media.encode import decode_mp4

        try:
            return decode_mp4(data)
        except Exception as e:
            reason = one_line(e, limit=None, show_type=False)[-300:]
            what = "MP4" if kind == "mp4" else "Matroska"
            raise UnreadableInput(f"not a decodable {what} video: {reason}") from None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))[None]
    except Exception as e:
        reason = one_line(e, limit=None, show_type=False)
        raise UnreadableInput(f"not a decodable {kind.upper()} image: {reason}") from None


def read_provenance(path_or_bytes: str | os.PathLike | bytes, *, watermark: bool = True, c2pa: bool = True) -> dict:
    """Everything an output says about where it came from: a JSON-able report.

    {file, format, watermark: {detected, score, threshold, level, ...} | None, tags, caption_matches
    (sha256 of the `comment` tag equals caption_sha256; None when either is missing), c2pa: the
    summary of `read_c2pa` | None, ok: watermark detected}. Raises UnreadableInput for a file that
    cannot be read or decoded.
    """
    name, data = _load(path_or_bytes)
    try:
        kind = _sniff(data)
    except UnreadableInput as e:
        raise UnreadableInput(f"{name}: {e}") from None
    try:
        tags = read_tags(data)
        frames = _frames(kind, data) if watermark else None
    except UnreadableInput as e:
        raise UnreadableInput(f"{name}: {e}") from None
    report: dict[str, Any] = {"file": name, "format": kind, "bytes": len(data)}
    if frames is not None:
        from pipeline.media.watermark import detect_watermark

        res = detect_watermark(frames)
        report["frames"] = int(frames.shape[0])
        report["size"] = f"{frames.shape[2]}x{frames.shape[1]}"
        report["watermark"] = res.as_dict()
    else:
        report["watermark"] = None
    report["tags"] = tags
    cap, want = tags.get("comment"), tags.get("caption_sha256")
    report["caption_matches"] = None if cap is None or want is None else caption_sha256(cap) == want
    report["c2pa"] = read_c2pa(data, _MIME[kind]) if c2pa and kind in C2PA_FORMATS else None
    report["ok"] = bool(report["watermark"] and report["watermark"]["detected"])
    return report


def format_report(report: dict) -> str:
    """The human-readable lines `reel verify` prints for one report."""
    wm = report.get("watermark")
    size = f" {report['size']}, {report['frames']} frame(s)" if wm else ""
    lines = [f"{report['file']}: {report['format']}{size}"]
    if wm:
        verdict = "DETECTED" if wm["detected"] else "not detected"
        lines.append(f"  watermark: {verdict} (score {wm['score']:.2f}, threshold {wm['threshold']:.1f})")
    tags = report.get("tags") or {}
    if tags:
        lines.append("  tags: " + ", ".join(f"{k}={v}" for k, v in tags.items() if k not in ("comment", "title")))
        if report.get("caption_matches") is not None:
            matches = "matches" if report["caption_matches"] else "DOES NOT match"
            lines.append(f"  caption hash: {matches} the comment tag")
    else:
        lines.append("  tags: none")
    c = report.get("c2pa")
    if c is None:
        lines.append("  c2pa: no manifest")
    elif c.get("error"):
        lines.append(f"  c2pa: {c['state']} ({c['error']})")
    else:
        signer = c.get("signer") or {}
        who = ", ".join(f"{k} {signer[k]}" for k in ("common_name", "issuer") if signer.get(k)) or "unknown signer"
        extra = f"; failures: {', '.join(c['failures'])}" if c.get("failures") else ""
        lines.append(f"  c2pa: {c['state']} (signed by {who}; generator {', '.join(c['claim_generator'])}{extra})")
    return "\n".join(lines)
