"""`reel render --model <Wan folder>` with each render replica a group of Ray rank actors (pipeline/stages/
replica.py) gives the one-rank frames: `--sp 2`, `--tp 2`, `--cfg-parallel` and `--sp 2 --tp 2` (4 ranks).

Each run is the whole pipeline in-process on the session's local Ray (`ray_session`, 2 CPUs; no new Ray per
layout): the driver, Ray Data, the render actor starting its ranks in a PACK placement group of its own
(0.5 CPU split over the ranks: 4 ranks of 0.125 CPU fit beside the other stages), the writer. The folder is
a tiny Wan 2.1 T2V one with 4 heads, so that sp=2 is Ulysses in both sp layouts (as on a real checkpoint's
40 heads; the 2-head session folder would make sp2 x tp2 a ring). One row: 32x32, 5 frames, 2 steps,
guided with a negative prompt (cfg=2 splits the two passes).

The runs write the lossless FFV1 master (its decoded frames are the rendered frames, whose sha256 the
metadata records) and are compared with the one-rank generator on one thread, as CPU ranks run:
* sp2 (Ulysses moves whole heads) and cfg2 (each rank runs the one-rank forward) record the one-rank
  `frames_sha256`, to the bit;
* layouts with tp sum partial products in another order: their frames are within 1 level of the one rank's
  (the bound tests/models/wan/test_wan_parallel.py holds at the model level).
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest

ROW = {"id": "wan-group", "prompt": "a blue square falls", "negative_prompt": "blurry", "width": 32, "height": 32,
       "frames": 5, "steps": 2, "seed": 4}
#: name -> (reel render flags, run.json's "parallel", whether the frames are the one rank's to the bit)
LAYOUTS = {
    "sp2": (["--sp", "2"], {"sp": 2, "tp": 1, "cfg": 1}, True),
    "tp2": (["--tp", "2"], {"sp": 1, "tp": 2, "cfg": 1}, False),
    "cfg2": (["--cfg-parallel"], {"sp": 1, "tp": 1, "cfg": 2}, True),
    "sp2 x tp2": (["--sp", "2", "--tp", "2"], {"sp": 2, "tp": 2, "cfg": 1}, False),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A tiny Wan 2.1 T2V folder with 4 heads (tp=2 and Ulysses sp=2 divide them together)."""
    from tests.conftest import build_wan_folder

    path = tmp_path_factory.mktemp("wan4") / "Tiny-wan21-4heads-Diffusers"
    build_wan_folder(path, "wan21", heads=4)
    return str(path)


def one_rank_frames(folder: str, meta: dict) -> np.ndarray:
    """The frames (watermarked, as written) the one-rank generator renders for the clip `meta` records,
    on one thread as the CPU ranks run."""
    import torch

    from models.interface import RenderRequest, load_generator
    from pipeline.media.watermark import embed_watermark

    request = RenderRequest(caption=meta["caption"], negative_caption=meta["negative_prompt"], width=meta["width"],
                            height=meta["height"], frames=meta["frames"], fps=meta["fps"], seed=meta["seed"],
                            steps=meta["steps"], guidance=meta["guidance"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        frames = load_generator(folder, device="cpu").generate([request])[0].frames
    finally:
        torch.set_num_threads(threads)
    assert frames.std() > 1  # a real signal
    return embed_watermark(frames)


@pytest.mark.parametrize("name", LAYOUTS)
def test_reel_render_over_a_group_gives_the_one_rank_frames(name, ray_session, folder, tmp_path):
    import pyarrow.parquet as pq
    from ray.util.placement_group import placement_group_table

    from pipeline.batch.processor import render_placement_prefix
    from pipeline.cli import main
    from pipeline.media.encode import decode_mp4

    flags, parallel, bit_equal = LAYOUTS[name]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps(ROW) + "\n")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code = main(["render", str(manifest), "--out", str(out), "--model", folder, "--codec", "ffv1", "--no-progress",
                 *flags])
    seconds = time.perf_counter() - t0
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["parallel"] == {**parallel, "ulysses": None} and run["counts"]["rendered"] == 1
    # the render stage ran as one group of sp·tp·cfg ranks, 0.5 CPU split over them, its placement group
    # named after the run (removed when the run ends: asynchronous, test_replica.py waits for it)
    world = parallel["sp"] * parallel["tp"] * parallel["cfg"]
    groups = [g for g in placement_group_table().values()
              if g["name"].startswith(render_placement_prefix(run["run_id"]))]
    assert [list(g["bundles"].values()) for g in groups] == [[{"CPU": 0.5 / world}] * world]

    [meta] = pq.read_table(out / "metadata").to_pylist()
    frames = decode_mp4((out / "videos" / f"{ROW['id']}.mkv").read_bytes())
    assert hashlib.sha256(frames.tobytes()).hexdigest() == meta["frames_sha256"]  # the master is lossless
    want = one_rank_frames(folder, meta)
    assert frames.shape == want.shape == (5, 32, 32, 3)
    diff = int(np.abs(frames.astype(int) - want).max())
    equal = meta["frames_sha256"] == hashlib.sha256(np.ascontiguousarray(want).tobytes()).hexdigest()
    print(f"\nreel render {' '.join(flags)} on a Wan folder: {seconds:.1f} s; max abs diff {diff}, "
          f"frames_sha256 of one rank: {equal}")
    assert diff <= 1
    if bit_equal:
        assert equal
