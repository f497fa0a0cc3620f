"""Wan over a group of ranks (models/wan/parallel.py) against one rank, in real processes.

Each group is N processes (this file run as a script, one per rank) joined over gloo on 127.0.0.1, as a
render replica's ranks are; every rank loads the tiny Wan folder through `load_generator(...,
parallel=layout)` and renders the same guided request. Rank 0 writes the frames and the latents; the
test compares them with the one-rank generator (itself equal to diffusers' WanPipeline to the bit,
tests/models/wan/test_wan_generator.py).

The folders: a Wan 2.1 T2V one with 4 heads (so tp=2 and Ulysses sp=2 divide them together) and the
session's TI2V-5B one (per-token timesteps, split with the tokens). The requests' token counts (27 and 9)
are odd: every sp layout pads its last shard.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.interface import ParallelConfig, ParallelConfigError, RenderRequest, load_generator  # noqa: E402

#: 48x48 x 9 frames: a latent grid of 3 x 3 x 3 patches = 27 tokens
REQUEST = RenderRequest(caption="a red circle moves right", negative_caption="blurry static", width=48, height=48,
                        frames=9, fps=16, seed=5, steps=2, guidance=5.0)
#: TI2V-5B (16x VAE, patch 2): 96x32 x 9 frames = 3 x 3 x 1 patches = 9 tokens
TI2V_REQUEST = dataclasses.replace(REQUEST, width=96, height=32)
#: name -> (folder, sp, tp, cfg, ulysses or None), per group size
LAYOUTS = {
    2: {"sp2 (ulysses 2)": ("wan21", 2, 1, 1, None), "sp2 (ring 2)": ("wan21", 2, 1, 1, 1),
        "tp2": ("wan21", 1, 2, 1, None), "cfg2": ("wan21", 1, 1, 2, None), "ti2v sp2": ("ti2v", 2, 1, 1, None)},
    4: {"sp2 x tp2": ("wan21", 2, 2, 1, None), "sp4 (ulysses 2 x ring 2)": ("wan21", 4, 1, 1, 2),
        "cfg2 x sp2": ("wan21", 2, 1, 2, None)},
}
LATENT_TOL = 1e-4
#: the step cache: 8 steps at a threshold where one rank computes 3 of them; the layouts that render it too
CACHED_REQUEST = dataclasses.replace(REQUEST, steps=8, step_cache=0.1)
CACHED_LAYOUTS = ("sp2 (ring 2)", "cfg2", "sp2 x tp2", "cfg2 x sp2")


def request_for(variant: str) -> RenderRequest:
    return TI2V_REQUEST if variant == "ti2v" else REQUEST


def render(gen, r: RenderRequest) -> tuple[np.ndarray, torch.Tensor]:
    """(frames of `generate`, the latents of the same request) on this rank."""
    frames = gen.generate([r])[0].frames
    with torch.no_grad():
        cond = gen.encode_text(r.caption).to(gen.transformer_dtype)
        uncond = gen.encode_text(r.negative_caption).to(gen.transformer_dtype)
        latents = gen.sample(r, cond, uncond)
    return frames, latents


# --- one rank (this file run as a script) ---------------------------------------------------------


def rank_main(rank: int, world: int, port: int, out_dir: str, folders: dict[str, str]) -> None:
    import torch.distributed as dist

    from models.interface import join_render_group

    torch.set_num_threads(1)
    join_render_group(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=120)
    results = {}
    for name, (variant, sp, tp, cfg, ulysses) in LAYOUTS[world].items():
        t0 = time.perf_counter()
        gen = load_generator(folders[variant], device="cpu",
                             parallel=ParallelConfig(sp=sp, tp=tp, cfg=cfg, ulysses=ulysses))
        frames, latents = render(gen, request_for(variant))
        results[name] = {"seconds": time.perf_counter() - t0, "ulysses": gen.mesh.ulysses, "ring": gen.mesh.ring}
        if rank == 0:
            np.save(os.path.join(out_dir, f"{name}.npy"), frames)
            torch.save(latents, os.path.join(out_dir, f"{name}.pt"))
        if name in CACHED_LAYOUTS:
            out = gen.generate([CACHED_REQUEST])[0]
            computed = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
            dist.all_gather(computed, torch.tensor([out.steps_computed]))
            results[name]["steps_computed"] = [int(c) for c in computed]
            if rank == 0:
                np.save(os.path.join(out_dir, f"{name} cached.npy"), out.frames)
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def folders(wan_folders, tmp_path_factory):
    """{"wan21": a 4-head Wan 2.1 folder, "ti2v": the session's TI2V-5B folder}."""
    from tests.conftest import build_wan_folder

    path = tmp_path_factory.mktemp("wan4") / "Tiny-wan21-4heads-Diffusers"
    build_wan_folder(path, "wan21", heads=4)
    return {"wan21": str(path), "ti2v": wan_folders["ti2v"]}


@pytest.fixture(scope="module")
def reference(folders):
    """{variant: (frames, latents)} of the one-rank generator (one thread, as the ranks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {v: render(load_generator(folder, device="cpu"), request_for(v)) for v, folder in folders.items()}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("world", [2, 4], ids=["2 ranks", "4 ranks"])
def test_every_layout_renders_the_one_rank_frames(world, folders, reference, tmp_path, run_ranks):
    t0 = time.perf_counter()
    results = run_ranks(__file__, world, tmp_path, json.dumps(folders), timeout=600,
                        env={"HF_HUB_OFFLINE": "1", "REELFORGE_CACHE": str(tmp_path / "cache")})
    seconds = time.perf_counter() - t0
    report = {}
    for name, (variant, *_) in LAYOUTS[world].items():
        want_frames, want_latents = reference[variant]
        frames, latents = np.load(tmp_path / f"{name}.npy"), torch.load(tmp_path / f"{name}.pt")
        assert frames.shape == want_frames.shape and latents.shape == want_latents.shape
        report[name] = {"latents max abs diff": (latents - want_latents).abs().max().item(),
                        "frames max abs diff": int(np.abs(frames.astype(int) - want_frames).max()),
                        "frames equal": bool(np.array_equal(frames, want_frames)),
                        "ulysses x ring": (results[name]["ulysses"], results[name]["ring"]),
                        "seconds": round(results[name]["seconds"], 1)}
    print(f"\n{world} ranks ({seconds:.1f} s): {report}")
    assert want_latents.abs().max() > 0.1 and reference["wan21"][0].std() > 1  # a real signal
    for name, r in report.items():
        assert r["latents max abs diff"] <= LATENT_TOL, (name, r)
        assert r["frames max abs diff"] <= 1, (name, r)
    cached = load_generator(folders["wan21"], device="cpu").generate([CACHED_REQUEST])[0]
    assert 1 < cached.steps_computed < CACHED_REQUEST.steps
    for name in CACHED_LAYOUTS:
        if name in LAYOUTS[world]:  # the step cache: every rank skips the one-rank render's steps
            assert results[name]["steps_computed"] == [cached.steps_computed] * world, name
            got = np.load(tmp_path / f"{name} cached.npy")
            assert np.abs(got.astype(int) - cached.frames).max() <= 1, name
    if world == 2:
        # each cfg rank runs the one-rank forward on the same inputs; the mix is the same arithmetic
        assert report["cfg2"]["latents max abs diff"] == 0 and report["cfg2"]["frames equal"]
        assert report["sp2 (ulysses 2)"]["ulysses x ring"] == (2, 1) and report["sp2 (ring 2)"]["ulysses x ring"] == (
            1, 2)
    else:
        assert report["sp2 x tp2"]["ulysses x ring"] == (2, 1)
        assert report["sp4 (ulysses 2 x ring 2)"]["ulysses x ring"] == (2, 2)


def test_a_layout_the_folder_or_process_cannot_take_is_refused_in_one_line(folders):
    with pytest.raises(ParallelConfigError, match=r"^parallel layout sp=1 x tp=8 x cfg=1: tp=8 must divide the "
                                                  r"heads \(4\), the width \(48\) and the MLP width \(32\)$"):
        load_generator(folders["wan21"], device="cpu", parallel=ParallelConfig(tp=8))
    # a process with no group, or (when an earlier test in this process made one) a group of one rank
    with pytest.raises(ParallelConfigError, match="needs an initialised process group|needs 2 ranks, the group has 1"):
        load_generator(folders["wan21"], device="cpu", parallel=ParallelConfig(sp=2))


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5]))
