"""FFV1 masters in Matroska (`--codec ffv1`): lossless RGB, deterministic bytes, tags read back, and
`reel verify` finding the watermark in them."""

import io

import av
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.media.encode import decode_mp4, encode_mkv, encode_mp4, encode_video
from pipeline.media.provenance import provenance_tags, read_provenance, read_tags
from pipeline.media.watermark import embed_watermark

MODEL = {"name": "tiny", "version": "0.1", "weights_sha256": "ab" * 32}


def random_frames(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def smooth_frames(t=6, h=64, w=64):
    """A moving gradient: content a watermark detector sees as a render, not noise."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 3 + 8 * i) % 256, (y * 3) % 256, np.full_like(x, 90)], -1) for i in range(t)]
    return np.asarray(frames, dtype=np.uint8)


@pytest.mark.parametrize("shape", [(5, 32, 48, 3), (3, 31, 17, 3), (1, 1, 1, 3)], ids=["even", "odd", "1px"])
def test_ffv1_gives_back_random_rgb_frames_byte_for_byte(shape):
    frames = random_frames(shape)
    data = encode_mkv(frames, 16)
    assert np.array_equal(decode_mp4(data), frames)
    assert encode_mkv(frames, 16) == data  # deterministic bytes
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert "matroska" in container.format.name
        assert (stream.codec_context.name, stream.format.name, stream.codec_context.width) == ("ffv1", "bgr0", shape[2])
        assert (stream.average_rate, sum(1 for _ in container.decode(stream))) == (16, shape[0])


def test_h264_is_not_lossless_so_the_round_trip_check_can_fail():
    frames = random_frames((5, 32, 48, 3))
    assert not np.array_equal(decode_mp4(encode_mp4(frames, 16)), frames)


def test_encode_video_picks_the_container_by_codec():
    frames = random_frames((2, 16, 16, 3))
    assert encode_video(frames, 8, "h264")[4:8] == b"ftyp"
    assert encode_video(frames, 8, "ffv1")[:4] == bytes.fromhex("1a45dfa3")  # EBML: Matroska
    with pytest.raises(ValueError, match=r"^codec must be one of h264, ffv1, got 'prores'$"):
        encode_video(frames, 8, "prores")


def test_matroska_tags_read_back_as_written():
    caption = "A caption = with; #signs\nand a second line, ünïcode"
    tags = {"title": "clip-1", "comment": caption, **provenance_tags(MODEL, caption, seed=3)}
    data = encode_mkv(random_frames((2, 16, 16, 3)), 8, metadata=tags)
    assert read_tags(data) == tags
    with av.open(io.BytesIO(data)) as container:  # PyAV reads the same file-wide tags (names upper-cased)
        theirs = {k.lower(): v for k, v in container.metadata.items() if k != "encoder"}
        track_tags = set(container.streams.video[0].metadata)
    assert theirs == tags
    assert {"ENCODER", "DURATION"} <= track_tags and not {"encoder", "duration"} & set(read_tags(data))


def test_reel_verify_finds_the_watermark_in_a_matroska_master(tmp_path, capsys):
    caption = "A red circle moves right."
    tags = {"title": "clip", "comment": caption, **provenance_tags(MODEL, caption, seed=1)}
    marked, unmarked = tmp_path / "marked.mkv", tmp_path / "unmarked.mkv"
    marked.write_bytes(encode_mkv(embed_watermark(smooth_frames()), 8, metadata=tags))
    unmarked.write_bytes(encode_mkv(smooth_frames(), 8, metadata=tags))

    report = read_provenance(str(marked))
    assert (report["format"], report["ok"], report["caption_matches"], report["c2pa"]) == ("mkv", True, True, None)
    assert report["tags"]["model_sha256"] == MODEL["weights_sha256"]
    assert main(["verify", str(marked)]) == 0
    out = capsys.readouterr().out
    assert f"{marked}: mkv 64x64, 6 frame(s)" in out and "watermark: DETECTED" in out and "c2pa: no manifest" in out
    assert main(["verify", str(unmarked)]) == 1

    truncated = tmp_path / "truncated.mkv"
    truncated.write_bytes(marked.read_bytes()[:300])
    assert main(["verify", str(truncated)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"reel verify: {truncated}: not a decodable Matroska video") and "\n" not in err
