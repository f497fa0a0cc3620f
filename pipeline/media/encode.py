"""Frames → H.264 MP4 or a lossless FFV1 Matroska master (+ a JPEG thumbnail), and a probe and a
decoder that read them back.

`encode_mp4` pipes raw RGB frames into the ffmpeg binary bundled with imageio-ffmpeg and gets an MP4
that browsers play: libx264, yuv420p, `+faststart` (the moov box before mdat, so playback starts
before the download ends). The frame size is kept exactly: ffmpeg is driven directly, not through
imageio's writer, so nothing is padded or resized to a macro-block multiple (the equivalent of
`macro_block_size=1`). yuv420p halves chroma in both directions, so width and height must be even:
odd sizes raise ValueError rather than being silently padded or cropped.

Output is deterministic: the same frames, fps, tags and options give the same bytes (`+bitexact`
drops the version-stamped encoder tags, no creation time is written, and the x264 thread count is
fixed, because x264's output depends on it). The bytes can differ between ffmpeg/x264 builds, so
"bit-for-bit again" holds for one imageio-ffmpeg version.

`encode_mkv` writes the master a studio grades and edits afterwards: FFV1 (level 3, every frame a
key frame, CRCs on its slices) in Matroska, pixel format `bgr0`, the only 8-bit RGB format ffmpeg's
FFV1 encoder takes (asked for rgb24 or gbrp, ffmpeg picks bgr0 too): the RGB bytes are only
re-ordered, so decoding gives back the frames exactly (a test encodes random frames and compares
bytes). A YUV format (even yuv444p) would round every pixel through the colour matrix. Any size
works, odd ones too (nothing is subsampled). `encode_video` picks the encoder by codec name.
"""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import tempfile
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = ["encode_video", "encode_mp4", "encode_mkv", "decode_mp4", "VIDEO_CODECS",
           "encode_jpeg", "encode_png", "thumbnail_frame", "probe_mp4",
           "mp4_top_level_boxes", "ffmpeg_exe", "check_frames", "EncodeError"]

DEFAULT_CRF = 18
DEFAULT_PRESET = "veryfast"
DEFAULT_THREADS = 2

#: `--codec` → the extension of the file it writes: H.264 in MP4 (browsers play it), or FFV1 in
#: Matroska (lossless RGB, for grading and editing)
VIDEO_CODECS = {"h264": "mp4", "ffv1": "mkv"}

# Keys the MP4 muxer stores as classic iTunes atoms (©nam, ©cmt, ...). Any other key needs
# `-movflags +use_metadata_tags`, which stores every tag as an mdta key/value pair instead.
_STANDARD_TAGS = frozenset({
    "title", "comment", "artist", "album", "album_artist", "composer", "date", "description", "genre",
    "copyright", "grouping", "lyrics", "synopsis", "show", "episode_id", "network", "keywords",
})
_TAG_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")


class EncodeError(RuntimeError):
    """ffmpeg failed; the message carries the tail of its log."""


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary inside the imageio-ffmpeg wheel (or IMAGEIO_FFMPEG_EXE)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def check_frames(frames: Any, min_side: int = 2) -> np.ndarray:
    """`frames` as a C-contiguous uint8 (T, H, W, 3) array holding at least one `min_side` x `min_side`
    frame; anything else is refused in one line (ValueError). The encoders' and the face blur's check."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    if t < 1 or h < min_side or w < min_side:
        raise ValueError(f"frames must hold at least one {min_side}x{min_side} frame, got shape {frames.shape}")
    return np.ascontiguousarray(frames)


def _metadata_args(metadata: dict[str, str] | None) -> tuple[list[str], bool]:
    args: list[str] = []
    custom = False
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not _TAG_KEY.fullmatch(key):
            raise ValueError(f"metadata key {key!r} must match {_TAG_KEY.pattern}")
        value = str(value)
        if "\x00" in value:
            raise ValueError(f"metadata value for {key!r} contains a NUL character")
        custom |= key not in _STANDARD_TAGS
        args += ["-metadata", f"{key}={value}"]
    return args, custom


def encode_video(frames: np.ndarray, fps: int, codec: str = "h264", *,
                 metadata: dict[str, str] | None = None) -> bytes:
    """Frames → the bytes of a `codec` file (a key of VIDEO_CODECS): `encode_mp4` or `encode_mkv`."""
    if codec == "h264":
        return encode_mp4(frames, fps, metadata=metadata)
    if codec == "ffv1":
        return encode_mkv(frames, fps, metadata=metadata)
    raise ValueError(f"codec must be one of {', '.join(VIDEO_CODECS)}, got {codec!r}")


def encode_mp4(
    frames: np.ndarray,
    fps: int,
    *,
    metadata: dict[str, str] | None = None,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
    threads: int = DEFAULT_THREADS,
) -> bytes:
    """(T, H, W, 3) uint8 RGB frames → MP4 bytes (H.264 High, yuv420p, faststart, `fps` frames/s).

    `metadata` becomes container tags (e.g. title, comment, generator, model, caption hash). Standard
    keys (title, comment, ...) are stored as iTunes atoms; when any other key is present, every tag
    is stored as an mdta key (`+use_metadata_tags`), which ffmpeg, PyAV and QuickTime read back.
    Keys match `[A-Za-z][A-Za-z0-9_.-]{0,63}`; values are any text.

    `crf` 18 is visually near-lossless; `preset` veryfast keeps CPU time low. `threads` is fixed
    (not "auto") so the bytes do not depend on the machine's core count.
    """
    frames = check_frames(frames)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"H.264 in yuv420p needs an even width and height, got {w}x{h}")
    tag_args, custom = _metadata_args(metadata)
    movflags = "+faststart" + ("+use_metadata_tags" if custom else "")
    return _ffmpeg_encode(frames, fps, "mp4", [
        "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
        "-threads", str(int(threads)),
        # RGB -> BT.709 limited-range YUV, tagged so, so browsers and decoders convert back alike
        "-vf", "scale=out_color_matrix=bt709:out_range=tv",
        "-colorspace", "bt709", "-color_primaries", "bt709", "-color_trc", "bt709", "-color_range", "tv",
        "-movflags", movflags, *tag_args,
    ])


def encode_mkv(frames: np.ndarray, fps: int, *, metadata: dict[str, str] | None = None,
               threads: int = DEFAULT_THREADS) -> bytes:
    """(T, H, W, 3) uint8 RGB frames → Matroska bytes holding them losslessly (FFV1 level 3, bgr0,
    intra-only, slice CRCs), `fps` frames/s. `metadata` becomes Matroska tags (keys as for
    `encode_mp4`; ffmpeg stores `title` as the segment's title and the other names upper-cased).
    `threads` is fixed: FFV1's slices, and so the bytes, follow it."""
    frames = check_frames(frames, min_side=1)
    tag_args, _ = _metadata_args(metadata)
    return _ffmpeg_encode(frames, fps, "matroska", [
        "-c:v", "ffv1", "-level", "3", "-g", "1", "-slicecrc", "1", "-pix_fmt", "bgr0",
        "-threads", str(int(threads)), *tag_args,
    ])


def _ffmpeg_encode(frames: np.ndarray, fps: int, container: str, codec_args: list[str]) -> bytes:
    """Checked uint8 RGB frames piped into the bundled ffmpeg with `codec_args`, written as `container`
    (an ffmpeg muxer name) to a temp file with no input metadata and bit-exact flags; its bytes."""
    t, h, w, _ = frames.shape
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps <= 0:
        raise ValueError(f"fps must be a positive integer, got {fps!r}")
    with tempfile.TemporaryDirectory(prefix="reelforge-encode-") as tmp:
        out = os.path.join(tmp, "clip")
        cmd = [
            ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-framerate", str(int(fps)), "-i", "pipe:0",
            "-map", "0:v:0", "-map_metadata", "-1", "-an", *codec_args,
            "-fflags", "+bitexact", "-flags:v", "+bitexact", "-f", container, out,
        ]
        proc = subprocess.run(cmd, input=frames.reshape(-1).data, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, check=False)
        if proc.returncode != 0:
            log = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
            raise EncodeError(f"ffmpeg exited with {proc.returncode} encoding {t}x{w}x{h}: {log}")
        with open(out, "rb") as f:
            return f.read()


def decode_mp4(data: bytes) -> np.ndarray:
    """Every frame of an MP4 (or of any container ffmpeg reads from the bytes: Matroska too) as uint8
    RGB (T, H, W, 3), through the same bundled ffmpeg."""
    import imageio_ffmpeg

    with tempfile.NamedTemporaryFile(suffix=".video") as f:
        f.write(data)
        f.flush()
        reader = imageio_ffmpeg.read_frames(f.name, pix_fmt="rgb24", bits_per_pixel=24)
        meta = next(reader)
        w, h = meta["size"]
        frames = [np.frombuffer(b, dtype=np.uint8).reshape(h, w, 3) for b in reader]
    if not frames:
        raise ValueError("the file holds no video frames")
    return np.stack(frames)


def thumbnail_frame(frames: np.ndarray) -> np.ndarray:
    """The middle frame of a (T, H, W, 3) clip."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"frames must be (T, H, W, C) with T >= 1, got shape {frames.shape}")
    return frames[len(frames) // 2]


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """One (H, W, 3) or (H, W) uint8 frame → baseline JPEG bytes (Pillow; deterministic)."""
    from PIL import Image

    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[-1] != 3):
        raise ValueError(f"frame must be (H, W, 3) or (H, W) uint8, got {frame.shape} {frame.dtype}")
    if not 1 <= quality <= 95:
        raise ValueError(f"quality must be in 1..95, got {quality}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame), "RGB" if frame.ndim == 3 else "L").save(
        buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def encode_png(frame: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """One (H, W, 3) uint8 frame → PNG bytes (lossless; deterministic), `text` as tEXt/iTXt chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"frame must be (H, W, 3) uint8, got {frame.shape} {frame.dtype}")
    info = PngInfo()
    for key, value in (text or {}).items():  # tEXt is Latin-1: other text goes in iTXt (UTF-8)
        info.add_text(str(key), str(value)) if str(value).isascii() else info.add_itxt(str(key), str(value))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame), "RGB").save(buf, "PNG", pnginfo=info, optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Reading back


def mp4_top_level_boxes(data: bytes) -> list[tuple[str, int, int]]:
    """(type, offset, size) of each top-level ISO-BMFF box, in file order. Stops at a truncated box."""
    boxes = []
    pos, n = 0, len(data)
    while pos + 8 <= n:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if size == 1:
            if pos + 16 > n:
                break
            size = struct.unpack(">Q", data[pos + 8:pos + 16])[0]
        elif size == 0:
            size = n - pos
        if size < 8:
            break
        boxes.append((kind.decode("latin-1"), pos, size))
        pos += size
    return boxes


def probe_mp4(data: bytes, *, decode: bool = False) -> dict[str, Any]:
    """What an MP4 holds: codec, pix_fmt, width, height, frames, fps, duration (s), faststart, tags.

    `faststart` is True when the moov box comes before mdat. `tags` are the container tags.
    With `decode=True` every frame is decoded too (a full integrity check) and `decoded_frames`
    is added. Needs PyAV (`av`). Raises ValueError when the bytes are not a readable MP4 video.
    """
    try:
        import av
    except ImportError as e:  # pragma: no cover - av ships with the test extras
        raise ImportError("probe_mp4 needs PyAV: pip install av") from e

    data = bytes(data)
    boxes = mp4_top_level_boxes(data)
    order = [b[0] for b in boxes]
    faststart = "moov" in order and "mdat" in order and order.index("moov") < order.index("mdat")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            rate = stream.average_rate or stream.guessed_rate or Fraction(0)
            frames = stream.frames
            if not frames:  # no sample table count: count packets
                frames = sum(1 for p in container.demux(stream) if p.size)
            if stream.duration is not None and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = frames / float(rate) if rate else 0.0
            info: dict[str, Any] = {
                "format": "mp4",
                "codec": ctx.name,
                "profile": ctx.profile,
                "pix_fmt": stream.format.name if stream.format else None,
                "width": ctx.width,
                "height": ctx.height,
                "frames": int(frames),
                "fps": float(rate),
                "duration": duration,
                "bit_rate": container.bit_rate,
                "bytes": len(data),
                "faststart": faststart,
                "boxes": order,
                "tags": dict(container.metadata),
            }
            if decode:
                container.seek(0)
                info["decoded_frames"] = sum(1 for _ in container.decode(stream))
    except av.error.FFmpegError as e:
        raise ValueError(f"not a readable MP4: {e}") from e
    return info
