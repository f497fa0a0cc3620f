"""The picture-conditioned modes on Wan image checkpoints through `reel render`'s pipeline (in-process on the
session's local Ray, lossless FFV1 masters): a tiny TI2V-5B folder renders i2v, extension forward and
backward and a storyboard, and refuses interpolation on its row; a tiny FLF2V folder interpolates keyframes
and two clips, and refuses i2v on its row. Each clip is compared, watermarked as written, with the frames
the generator gives for the requests the mode stands for (docs/MODELS.md), so each seam is the one asked:

    extend forward    the input, then frames 1..n of a request whose frame 0 is the input's last frame
    extend backward   frames 1..n of a request from the input's first frame, reversed, then the input
    storyboard        shot 1 from text, shot 2 frames 1..n of a request from shot 1's last frame
    interpolate       clips: the first clip, frames 1..7 of a 9-frame request from its last frame to the
                      second's first (5 asked, rounded up to the grid with the two ends), the second clip
"""

from __future__ import annotations

import numpy as np
import pytest

ROW = {"width": 32, "height": 32, "fps": 16, "steps": 2, "seed": 5}


def _render(folder: str, rows: list[dict], tmp_path) -> tuple[dict, dict]:
    from pipeline import storage
    from pipeline.batch.driver import RenderConfig, render_manifest
    from pipeline.batch.manifest import write_manifest

    manifest = str(tmp_path / "m.jsonl")
    write_manifest(rows, manifest)
    out = str(tmp_path / "out")
    summary = render_manifest(RenderConfig(manifest=manifest, out=out, model=folder, codec="ffv1", progress=False))
    meta = {m["id"]: m for m in storage.read_parquet_dataset(f"{out}/metadata").to_pylist()}
    return meta, {e.id: e.reason for e in summary.errors}


def _written(meta: dict) -> np.ndarray:
    from pipeline import storage
    from pipeline.media.encode import decode_mp4

    return decode_mp4(storage.read_bytes(meta["video_uri"]))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two pictures (PNG) and two 5-frame clips (FFV1) of 32x32, and what the inputs stage reads of them."""
    from PIL import Image

    from pipeline.media.decode import fit_frame, load_image, load_video
    from pipeline.media.encode import encode_mkv

    d = tmp_path_factory.mktemp("wan-image-inputs")
    rng = np.random.default_rng(1)
    files, read = {}, {}
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{name}.png")
        (d / f"{name}.mkv").write_bytes(encode_mkv(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), 16))
        files[f"{name}.png"], files[f"{name}.mkv"] = str(d / f"{name}.png"), str(d / f"{name}.mkv")
        read[f"{name}.png"] = fit_frame(load_image(files[f"{name}.png"]), 32, 32)[None]
        read[f"{name}.mkv"] = load_video(files[f"{name}.mkv"], 16, 32, 32)
    return files, read


def _expected(folder: str):
    """`frames(caption, frames, seed, cond, index)`: the one-rank generator's frames on one thread, as the
    CPU replica renders."""
    import torch

    from models.interface import RenderRequest, load_generator

    gen = load_generator(folder, device="cpu")

    def frames(caption, n, seed, cond=None, index=()):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            r = RenderRequest(caption=caption, width=32, height=32, frames=n, fps=16, seed=seed, steps=2,
                              guidance=5.0, cond_frames=cond, cond_index=index)
            return gen.generate([r])[0].frames
        finally:
            torch.set_num_threads(threads)

    return frames


def test_ti2v_i2v_extension_and_storyboard_through_reel_render(ray_session, wan_folders, inputs, tmp_path):
    from pipeline.media.watermark import embed_watermark

    files, read = inputs
    folder = wan_folders["ti2v"]
    rows = [{"id": "i2v", "prompt": "a red circle", "image": files["a.png"], "frames": 5, **ROW},
            {"id": "forward", "prompt": "a red circle moves", "video": files["a.mkv"], "frames": 5, **ROW},
            {"id": "backward", "prompt": "a blue square", "video": files["a.mkv"], "frames": 5,
             "direction": "backward", **ROW},
            {"id": "story", "shots": [{"prompt": "a cat", "seconds": 5 / 16}, {"prompt": "a dog", "seconds": 5 / 16}],
             **ROW},
            {"id": "between", "prompt": "a ball", "image": files["a.png"], "image_end": files["b.png"], **ROW}]
    meta, errors = _render(folder, rows, tmp_path)
    assert errors == {"between": "mode interpolate is not one this model renders; it renders t2v, image, remix, "
                                 "i2v, extend, storyboard"}
    frames = _expected(folder)
    clip = read["a.mkv"]
    want = {
        "i2v": frames("a red circle", 5, 5, read["a.png"], (0,)),
        "forward": np.concatenate([clip, frames("a red circle moves", 9, 5, clip[-1:], (0,))[1:6]]),
        "backward": np.concatenate([frames("a blue square", 9, 5, clip[:1], (0,))[1:6][::-1], clip]),
    }
    shot1 = frames("a cat", 5, 5)
    want["story"] = np.concatenate([shot1, frames("a dog", 9, 6, shot1[-1:], (0,))[1:6]])
    assert [(s["caption"], s["start_frame"], s["seed"]) for s in meta["story"]["shots"]] == [("a cat", 0, 5),
                                                                                           ("a dog", 5, 6)]
    for clip_id, expected in want.items():
        assert np.array_equal(_written(meta[clip_id]), embed_watermark(expected)), clip_id
    assert meta["forward"]["frames"] == 10 and meta["story"]["frames"] == 10


def test_flf2v_interpolates_keyframes_and_clips_through_reel_render(ray_session, wan_image_pipelines, inputs,
                                                                   tmp_path):
    from pipeline.media.watermark import embed_watermark

    files, read = inputs
    folder = wan_image_pipelines["flf2v"][0]
    rows = [{"id": "keys", "prompt": "a ball", "image": files["a.png"], "image_end": files["b.png"], "frames": 5,
             **ROW},
            {"id": "clips", "prompt": "a ball", "video": files["a.mkv"], "video_end": files["b.mkv"], "frames": 5,
             **ROW},
            {"id": "i2v", "prompt": "a ball", "image": files["a.png"], "frames": 5, **ROW}]
    meta, errors = _render(folder, rows, tmp_path)
    assert errors == {"i2v": "mode i2v is not one this model renders; it renders interpolate"}
    frames = _expected(folder)
    a, b = read["a.mkv"], read["b.mkv"]
    keys = frames("a ball", 5, 5, np.concatenate([read["a.png"], read["b.png"]]), (0, 4))
    gap = frames("a ball", 9, 5, np.concatenate([a[-1:], b[:1]]), (0, 8))[1:8]
    assert np.array_equal(_written(meta["keys"]), embed_watermark(keys))
    assert np.array_equal(_written(meta["clips"]), embed_watermark(np.concatenate([a, gap, b])))
