"""Input pictures and clips of the generation modes: read from any fsspec URI, fitted to a size.

    image = load_image("s3://bucket/first.png")            # uint8 (H, W, 3)
    frame = fit_frame(image, 64, 64)                        # resized to cover, centre-cropped
    clip = load_video("s3://bucket/clip.mp4", 8, 64, 64)    # uint8 (T, 64, 64, 3) at 8 fps

Images are PNG, JPEG or WebP (anything Pillow reads, checked by content, not by name); clips are
anything the bundled ffmpeg decodes (MP4, MOV, WebM, GIF …). A clip is resampled to the asked
frame rate by time (ffmpeg's fps filter) and fitted to the size the same way as an image. Every
failure is a `MediaError` whose message starts with the column it came from and says what to do.
"""

from __future__ import annotations

import io
import subprocess
import tempfile

import numpy as np

from pipeline import storage
from pipeline.errors import UserError, one_line

#: Longest input clip, in frames after resampling (bounds the memory a row can ask for).
MAX_INPUT_FRAMES = 1800
MAX_IMAGE_PIXELS = 64_000_000


class MediaError(UserError):
    """An input image or clip that cannot be used; the message is one line."""


def read_input(uri: str, column: str) -> bytes:
    """The bytes at an input URI; a MediaError naming the column when they cannot be had."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise MediaError(f"{column}: {uri} does not exist") from None
    except Exception as e:
        raise MediaError(f"{column}: cannot read {uri} ({one_line(e, 200)})") from None
    if not data:
        raise MediaError(f"{column}: {uri} is empty")
    return data


def load_image(uri: str, column: str = "image") -> np.ndarray:
    """An image file as uint8 RGB (H, W, 3); alpha is composited over black."""
    return decode_image(read_input(uri, column), column, uri)


def decode_image(data: bytes, column: str = "image", name: str = "the image") -> np.ndarray:
    """PNG, JPEG or WebP bytes as uint8 RGB (H, W, 3); alpha is composited over black. `name`
    (a URI, or words for an upload) is what a MediaError calls the input."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise MediaError(f"{column}: {name} is {im.width}x{im.height}; the limit is {MAX_IMAGE_PIXELS} pixels")
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(background, im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"{column}: {name} is not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:  # Pillow refuses it in open(), before our own size check
        raise MediaError(f"{column}: {name} declares more than {MAX_IMAGE_PIXELS} pixels "
                         "(a decompression bomb or a far too large image)") from None
    except (OSError, SyntaxError, ValueError) as e:  # a truncated or corrupt file
        raise MediaError(f"{column}: {name} is not a readable PNG, JPEG or WebP image ({one_line(e, 120)})") from None


def fit_frame(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize (Lanczos) so the image covers width×height, then crop the centre to exactly that."""
    from PIL import Image, ImageOps

    fitted = ImageOps.fit(Image.fromarray(image), (width, height), method=Image.Resampling.LANCZOS)
    return np.asarray(fitted, dtype=np.uint8).copy()


def probe_video(data: bytes, column: str, uri: str) -> tuple[int, int, float]:
    """(width, height, duration in seconds) of a clip's first video stream (the duration as the
    container states it; 0.0 when it states none)."""
    import imageio_ffmpeg

    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        try:
            reader = imageio_ffmpeg.read_frames(f.name)
            meta = next(reader)
            reader.close()
        except Exception:  # ffmpeg found no container or no video stream
            raise MediaError(f"{column}: {uri} is not a readable video file (MP4, MOV, WebM, GIF …)") from None
    w, h = meta.get("size") or (0, 0)
    if not w or not h:
        raise MediaError(f"{column}: {uri} has no video stream")
    return int(w), int(h), float(meta.get("duration") or 0.0)


def load_video(uri: str, fps: int, width: int, height: int, column: str = "video",
               data: bytes | None = None) -> np.ndarray:
    """A clip as uint8 RGB (T, height, width, 3) at `fps`, fitted like `fit_frame`."""
    import imageio_ffmpeg

    data = read_input(uri, column) if data is None else data
    vf = (f"fps={int(fps)},scale={width}:{height}:force_original_aspect_ratio=increase:flags=lanczos,"
          f"crop={width}:{height}")
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-nostdin", "-i", f.name, "-map", "0:v:0",
               "-vf", vf, "-frames:v", str(MAX_INPUT_FRAMES + 1), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
        proc = subprocess.run(cmd, capture_output=True)
    size = width * height * 3
    if proc.returncode != 0 and not proc.stdout:
        why = " ".join(proc.stderr.decode(errors="replace").split())[-200:]
        raise MediaError(f"{column}: {uri} is not a readable video ({why or 'ffmpeg failed'})")
    n = len(proc.stdout) // size
    if n == 0:
        raise MediaError(f"{column}: {uri} holds no video frames")
    if n > MAX_INPUT_FRAMES:
        raise MediaError(f"{column}: {uri} is longer than {MAX_INPUT_FRAMES} frames at {fps} fps; trim it first")
    return np.frombuffer(proc.stdout[: n * size], dtype=np.uint8).reshape(n, height, width, 3).copy()
