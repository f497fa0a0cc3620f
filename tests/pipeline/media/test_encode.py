"""encode_mp4 / encode_jpeg / probe_mp4 against the real ffmpeg (imageio-ffmpeg) and PyAV."""

import io

import av
import numpy as np
import pytest

from pipeline.media.encode import EncodeError, encode_jpeg, encode_mp4, mp4_top_level_boxes, probe_mp4, thumbnail_frame


def clip(t, h, w, seed=0):
    """A smooth moving gradient with a coloured square: content a codec treats like a real clip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = np.empty((t, h, w, 3), np.uint8)
    base = rng.uniform(40, 200, 3)
    for i in range(t):
        img = np.stack([base[0] + 50 * np.sin((xx + 3 * i) / 17), base[1] + 50 * np.cos((yy - 2 * i) / 13),
                        base[2] + 40 * np.sin((xx + yy) / 23 + i / 5)], axis=-1)
        s = max(4, min(h, w) // 4)
        y0, x0 = (i * 3) % (h - s), (i * 5) % (w - s)
        img[y0:y0 + s, x0:x0 + s] = (230, 40, 40)
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def decode(data):
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("t,h,w", [(8, 64, 64), (8, 64, 96), (8, 96, 64), (5, 720, 1280), (3, 360, 638)])
def test_round_trip_keeps_size_and_frame_count(t, h, w):
    frames = clip(t, h, w)
    data = encode_mp4(frames, 8)
    out = decode(data)
    assert out.shape == frames.shape  # no padding/resizing to multiples of 16
    err = np.abs(out.astype(np.int16) - frames).mean()
    assert err < 3.0, err
    info = probe_mp4(data, decode=True)
    assert (info["codec"], info["pix_fmt"], info["width"], info["height"]) == ("h264", "yuv420p", w, h)
    assert info["frames"] == info["decoded_frames"] == t
    assert info["fps"] == 8 and info["duration"] == pytest.approx(t / 8)
    assert info["faststart"]


def test_faststart_moov_before_mdat_and_browser_friendly():
    data = encode_mp4(clip(4, 64, 64), 24)
    kinds = [k for k, _, _ in mp4_top_level_boxes(data)]
    assert kinds[0] == "ftyp" and kinds.index("moov") < kinds.index("mdat")
    info = probe_mp4(data)
    assert info["profile"] in ("High", "Main", "Constrained Baseline")
    assert info["fps"] == 24


def test_tags_read_back_standard_and_custom():
    tags = {"title": "red-ball", "comment": "A red ball, ünïcode = fine; \"quoted\"",
            "encoder_generator": "reelforge tiny 0.1", "caption_sha256": "ab" * 32}
    info = probe_mp4(encode_mp4(clip(2, 64, 64), 8, metadata=tags))
    for k, v in tags.items():
        assert info["tags"][k] == v
    only_standard = probe_mp4(encode_mp4(clip(2, 64, 64), 8, metadata={"title": "t", "comment": "c"}))
    assert (only_standard["tags"]["title"], only_standard["tags"]["comment"]) == ("t", "c")


def test_bit_exact_same_frames_same_bytes():
    frames = clip(6, 64, 96, seed=3)
    tags = {"title": "x", "encoder_generator": "reelforge"}
    a = encode_mp4(frames, 8, metadata=tags)
    assert encode_mp4(frames.copy(), 8, metadata=tags) == a
    assert encode_mp4(frames, 8, metadata={**tags, "title": "y"}) != a
    assert "encoder" not in probe_mp4(a)["tags"]  # +bitexact: no version-stamped "Lavf…" muxer tag


def test_bad_input_is_refused_not_padded():
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 63, 64, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 64, 65, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(np.zeros((2, 64, 64, 3), np.float32), 8)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        encode_mp4(np.zeros((64, 64, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(np.zeros((2, 64, 64, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="metadata key"):
        encode_mp4(np.zeros((2, 64, 64, 3), np.uint8), 8, metadata={"bad key=": "v"})
    with pytest.raises(EncodeError, match="ffmpeg"):
        encode_mp4(np.zeros((2, 64, 64, 3), np.uint8), 8, preset="no-such-preset")


def test_probe_rejects_garbage():
    with pytest.raises(ValueError):
        probe_mp4(b"\x00\x00\x00\x08junk" * 10)


def test_thumbnail_and_jpeg():
    frames = clip(5, 64, 96)
    thumb = thumbnail_frame(frames)
    assert np.array_equal(thumb, frames[2])
    data = encode_jpeg(thumb, quality=90)
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    assert encode_jpeg(thumb, quality=90) == data
    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert img.shape == (64, 96, 3) and np.abs(img.astype(np.int16) - thumb).mean() < 4
    with pytest.raises(ValueError):
        encode_jpeg(thumb.astype(np.float32))
