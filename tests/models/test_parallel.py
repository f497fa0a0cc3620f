"""The parallel DiT (models/parallel.py) against the single-process reference, in real processes.

Each group is N real processes (this file run as a script, one per rank) joined over gloo on
127.0.0.1 with DeepSpeed's comm initialised, as a render replica's ranks are. Every layout runs
the whole guided sampler with frame conditioning on a tiny random model whose token count (a
latent grid of 3x5x3 patches = 45 tokens) no group size here divides, and rank 0 writes the
latents; the test compares them with the single-process sampler (fp32, max abs diff <= 1e-4).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.config import ParallelConfig, ParallelConfigError, check_layout, load_config  # noqa: E402  # noqa: E402
from models.dit import VideoDiT  # noqa: E402
from models.sampler import FlowMatchSampler  # noqa: E402
from models.step_cache import StepCache  # noqa: E402

TOL = 1e-4
GUIDANCE, STEPS, SHIFT = 4.5, 3, 2.0
# Layouts per group size: name -> (sp, tp, cfg, ulysses or None)
LAYOUTS = {
    2: {"sp2 (ulysses 2)": (2, 1, 1, None), "sp2 (ring 2)": (2, 1, 1, 1), "tp2": (1, 2, 1, None),
        "cfg2": (1, 1, 2, None)},
    4: {"sp2xtp2": (2, 2, 1, None), "sp4 (ulysses 2 x ring 2)": (4, 1, 1, None), "cfg2xsp2": (2, 1, 2, None)},
}


def model_config():
    # tiny (2 heads, width 64) with a larger text width cut down for speed; random init, frame
    # positions on (each shard embeds the positions of its own tokens)
    return load_config("tiny", overrides={"text": {"dim": 32}, "dit": {"frame_positions": True}})


def build_dit() -> VideoDiT:
    torch.manual_seed(0)
    return VideoDiT(model_config().dit).eval().requires_grad_(False)


def make_inputs(grid=(3, 5, 3)):
    """Noise, text states and frame conditioning for a latent grid of `grid` patches (seeded)."""
    cfg = model_config()
    pt, ph, pw = cfg.dit.patch_size
    g = torch.Generator().manual_seed(1)
    c = cfg.vae.latent_channels
    shape = (1, c, grid[0] * pt, grid[1] * ph, grid[2] * pw)
    noise = torch.randn(shape, generator=g)
    text = torch.randn(1, 7, cfg.text.dim, generator=g)
    uncond = torch.randn(1, 7, cfg.text.dim, generator=g)
    text_mask = torch.tensor([[True] * 5 + [False] * 2])
    uncond_mask = torch.tensor([[True] * 2 + [False] * 5])
    cond_latents = torch.randn(shape, generator=g)
    cond_mask = torch.zeros(1, shape[2])
    cond_mask[0, 0] = 1
    return dict(noise=noise, text=text, text_mask=text_mask, uncond_text=uncond, uncond_mask=uncond_mask,
                cond_latents=cond_latents, cond_mask=cond_mask)


DECODE_TILE, DECODE_OVERLAP = (1, 6, 8), 3


def small_vae():
    from models.vae import VideoAutoencoder

    torch.manual_seed(0)
    return VideoAutoencoder(model_config().vae).eval().requires_grad_(False)


def SMALL_LATENTS():
    return torch.randn(1, 4, 2, 8, 12, generator=torch.Generator().manual_seed(3))


def reference_latents(steps: int = STEPS, step_cache: StepCache | None = None):
    x = make_inputs()
    return FlowMatchSampler(steps, GUIDANCE, SHIFT).sample(
        build_dit(), x["noise"], x["text"], x["text_mask"], x["uncond_text"], x["uncond_mask"],
        cond_latents=x["cond_latents"], cond_mask=x["cond_mask"], step_cache=step_cache)


# the step cache: 8 steps at a threshold where the one-process render skips half of them
CACHE_STEPS, CACHE_THRESHOLD = 8, 0.05


# --- one rank (this file run as a script) ---------------------------------------------------------


def rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from models.parallel import ParallelSampler, build_mesh, init_distributed, parallelize

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=120)
    results = {}
    x = make_inputs()
    for name, (sp, tp, cfg, uly) in LAYOUTS[world].items():
        mesh = build_mesh(ParallelConfig(sp=sp, tp=tp, cfg=cfg, ulysses=uly), model_config().dit, guidance=GUIDANCE)
        pdit = parallelize(build_dit(), mesh)
        t0 = time.perf_counter()
        latents = ParallelSampler(mesh, STEPS, GUIDANCE, SHIFT).sample(
            pdit, x["noise"], x["text"], x["text_mask"], x["uncond_text"], x["uncond_mask"],
            cond_latents=x["cond_latents"], cond_mask=x["cond_mask"])
        results[name] = {"seconds": time.perf_counter() - t0, "ulysses": mesh.ulysses, "ring": mesh.ring}
        group = dist.group.WORLD  # the step cache's decisions, agreed over the whole group
        cache = StepCache(CACHE_THRESHOLD, group=group, contributes=mesh.tp_rank == 0)
        cached = ParallelSampler(mesh, CACHE_STEPS, GUIDANCE, SHIFT).sample(
            pdit, x["noise"], x["text"], x["text_mask"], x["uncond_text"], x["uncond_mask"],
            cond_latents=x["cond_latents"], cond_mask=x["cond_mask"], step_cache=cache)
        computed = torch.tensor([cache.steps_computed])
        every = [torch.zeros_like(computed) for _ in range(world)]
        dist.all_gather(every, computed)
        results[name]["steps_computed"] = [int(c) for c in every]
        if rank == 0:
            torch.save(latents, os.path.join(out_dir, f"{name}.pt"))
            torch.save(cached, os.path.join(out_dir, f"{name} cached.pt"))
    if world == 4:  # a grid of 3 tokens over sp=4: the last rank holds padding only
        mesh = build_mesh(ParallelConfig(sp=4), model_config().dit)
        tiny = make_inputs(grid=(1, 1, 3))
        pdit = parallelize(build_dit(), mesh)
        v = pdit(tiny["noise"], torch.tensor([0.7]), tiny["text"], tiny["text_mask"], tiny["cond_latents"],
                 tiny["cond_mask"])
        if rank == 0:
            torch.save(v, os.path.join(out_dir, "forward 3 tokens over sp4.pt"))
    if world == 2:  # the tiled VAE decode spread over the group: tiles alternate between the ranks
        video = small_vae().decode_tiled(SMALL_LATENTS(), tile=DECODE_TILE, overlap=DECODE_OVERLAP,
                                         group=dist.group.WORLD)
        if rank == 0:
            torch.save(video, os.path.join(out_dir, "decode.pt"))
        else:
            assert video is None
    try:  # a layout the group cannot hold is refused at start-up
        build_mesh(ParallelConfig(sp=world * 2), model_config().dit)
        results["refused"] = None
    except ParallelConfigError as e:
        results["refused"] = str(e)
    if rank == 0:
        Path(out_dir, "results.json").write_text(json.dumps(results))
    if world == 2:  # the same processes then take a 1080p 20 s latent (one process start less)
        rank_1080p(rank, world, port, out_dir)
    dist.barrier()
    dist.destroy_process_group()


# 1920x1080, 20 s at the models' default 8 fps = 160 frames: latents (4, 40, 270, 480) with the tiny
# VAE (4x space, 4x time). The tiny DiT gets 2x15x15 patches (11,520 tokens) so its attention runs
# in seconds here; the VAE is narrowed to 4 channels a level so a 1080p frame decodes in seconds.
HD_FRAMES, HD_SIZE = 160, (1080, 1920)
HD_OVERRIDES = {"text": {"dim": 32}, "dit": {"patch_size": [2, 15, 15]},
                "vae": {"block_out_channels": [4, 4, 4], "temporal_kernel": 1}}
HD_TILE, HD_OVERLAP, HD_CHUNKS = (1, 139, 244), 8, 2


def rank_1080p(rank: int, world: int, port: int, out_dir: str) -> None:
    """One sampler step of a 1080p 20 s latent over sp=world, then the first chunks of its tiled decode
    spread over the ranks; records this rank's peak RSS in each phase (Linux VmHWM, reset between)."""
    import torch.distributed as dist

    from models.parallel import ParallelSampler, build_mesh, init_distributed, parallelize
    from models.vae import VideoAutoencoder

    def peak_mb(reset: bool = True) -> float:
        """This process's peak RSS (VmHWM) since the last reset, in MB; then reset it to the current RSS."""
        status = Path("/proc/self/status").read_text()
        hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        return hwm

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=300)
    peak_mb()  # from here on
    cfg = load_config("tiny", overrides=HD_OVERRIDES)
    torch.manual_seed(0)
    dit, vae = VideoDiT(cfg.dit).eval(), VideoAutoencoder(cfg.vae).eval().requires_grad_(False)
    mesh = build_mesh(ParallelConfig(sp=world), cfg.dit, guidance=GUIDANCE)
    pdit = parallelize(dit, mesh)
    shape = (1, *vae.latent_shape(HD_FRAMES, *HD_SIZE))
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=g)
    text, uncond = torch.randn(1, 7, 32, generator=g), torch.randn(1, 7, 32, generator=g)
    mask = torch.ones(1, 7, dtype=torch.bool)
    record = {"latent_shape": list(shape), "setup_mb": peak_mb()}
    t0 = time.perf_counter()
    latents = ParallelSampler(mesh, 1, GUIDANCE, SHIFT).sample(pdit, noise, text, mask, uncond, mask)
    record.update(sample_s=time.perf_counter() - t0, tokens=pdit.shard.n_tokens, sample_mb=peak_mb())
    t0 = time.perf_counter()
    chunks = []
    with torch.no_grad():
        for k, chunk in enumerate(vae.iter_decode_tiled(latents, tile=HD_TILE, overlap=HD_OVERLAP,
                                                        group=dist.group.WORLD, uint8=True)):
            if chunk is not None:
                chunks.append([list(chunk.shape), str(chunk.dtype), float(chunk.float().std())])
            record[f"chunk{k + 1}_mb"] = peak_mb()
            if k + 1 == HD_CHUNKS:
                break
    record.update(decode_s=time.perf_counter() - t0, chunks=chunks)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))


def run_group(run_ranks, world: int, out_dir: Path, timeout: float = 300) -> dict:
    # a fixed mmap threshold: freed large buffers go back to the OS, so RSS follows live memory
    results = run_ranks(__file__, world, out_dir, env={"MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=timeout)
    if world == 2:
        results["1080p"] = {r: json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)}
    return results


@pytest.fixture(scope="module")
def reference():
    return reference_latents()


def _group(world, tmp_path_factory, run_ranks):
    out = tmp_path_factory.mktemp(f"group{world}")
    t0 = time.perf_counter()
    results = run_group(run_ranks, world, out)
    return world, out, results, time.perf_counter() - t0


@pytest.fixture(scope="module")
def group2(tmp_path_factory, run_ranks):
    """2 ranks: sp2 (Ulysses), sp2 (ring), tp2, cfg2, the spread decode, then the 1080p latent."""
    return _group(2, tmp_path_factory, run_ranks)


@pytest.fixture(scope="module")
def group4(tmp_path_factory, run_ranks):
    """4 ranks: sp2 x tp2, sp4 (Ulysses 2 x ring 2), cfg2 x sp2, a shard of padding only."""
    return _group(4, tmp_path_factory, run_ranks)


@pytest.mark.parametrize("world", [2, 4], ids=["2 ranks", "4 ranks"])
def test_parallel_sampler_matches_single_process(world, request, reference):
    world, out, results, seconds = request.getfixturevalue(f"group{world}")
    assert reference.abs().max() > 0.1  # a real signal to compare
    diffs = {}
    for name in LAYOUTS[world]:
        latents = torch.load(out / f"{name}.pt")
        assert latents.shape == reference.shape
        diffs[name] = (latents - reference).abs().max().item()
    print(f"\n{world} ranks ({seconds:.1f} s): max abs diff per layout {diffs}; degrees "
          f"{ {k: (results[k]['ulysses'], results[k]['ring']) for k in LAYOUTS[world]} }")
    assert all(d <= TOL for d in diffs.values()), diffs
    # the USP split is what the layout asks for
    if world == 2:
        assert (results["sp2 (ulysses 2)"]["ulysses"], results["sp2 (ring 2)"]["ring"]) == (2, 2)
    else:
        assert (results["sp4 (ulysses 2 x ring 2)"]["ulysses"], results["sp4 (ulysses 2 x ring 2)"]["ring"]) == (2, 2)
        assert results["sp2xtp2"]["ring"] == 2  # one head per tp rank: sp is all ring


@pytest.mark.parametrize("world", [2, 4], ids=["2 ranks", "4 ranks"])
def test_step_cache_decisions_are_agreed_and_equal_the_single_process(world, request):
    """Every rank of every layout (sp, tp, cfg, cfg x sp) skips the steps the one-process render skips,
    and the cached latents are its cached latents."""
    world, out, results, _ = request.getfixturevalue(f"group{world}")
    cache = StepCache(CACHE_THRESHOLD)
    reference = reference_latents(CACHE_STEPS, cache)
    assert 1 < cache.steps_computed < CACHE_STEPS  # some steps skipped, not all
    assert (reference - reference_latents(CACHE_STEPS)).abs().max() > 10 * TOL  # skipping changes the result
    for name in LAYOUTS[world]:
        assert results[name]["steps_computed"] == [cache.steps_computed] * world, name
        got = torch.load(out / f"{name} cached.pt")
        assert (got - reference).abs().max().item() <= TOL, name


def test_padding_only_shard_changes_nothing(group4):
    _, out, _, _ = group4
    x = make_inputs(grid=(1, 1, 3))
    ref = build_dit()(x["noise"], torch.tensor([0.7]), x["text"], x["text_mask"], x["cond_latents"], x["cond_mask"])
    got = torch.load(out / "forward 3 tokens over sp4.pt")
    assert (got - ref).abs().max().item() <= TOL


def test_decode_spread_over_ranks_is_the_tiled_decode(group2):
    _, out, _, _ = group2
    with torch.no_grad():
        single = small_vae().decode_tiled(SMALL_LATENTS(), tile=DECODE_TILE, overlap=DECODE_OVERLAP)
    got = torch.load(out / "decode.pt")
    assert got.shape == single.shape == (1, 3, 8, 32, 48)
    assert (got - single).abs().max().item() <= 1e-6


@pytest.mark.parametrize("world", [2, 4], ids=["2 ranks", "4 ranks"])
def test_group_refuses_a_layout_it_cannot_hold(world, request):
    world, _, results, _ = request.getfixturevalue(f"group{world}")
    assert results["refused"] == f"parallel layout sp={2 * world} x tp=1 x cfg=1 needs {2 * world} ranks, " \
                                 f"the group has {world}"


HD_PEAK_BOUND_MB = 1536


def test_1080p_20s_latents_pass_with_bounded_memory_per_rank(group2):
    """A 1920x1080, 20 s latent through the sharded attention (sp=2, one guided step) and the first
    two chunks of the tiled decode spread over both ranks.

    Bound: 1.5 GB peak RSS per rank in every phase, the runtime (torch + DeepSpeed, ~0.35 GB)
    included. What fills it is latent-sized (83 MB a copy: noise, x, [x; x], the gathered
    velocity), one 4-frame chunk of pixels and one tile's decoder activations. Unbounded, the same
    work would hold the whole decoded clip (160 x 3 x 1080 x 1920 fp32 = 4 GB, its activations 5+ GB
    a tensor) and a full attention matrix (2 x 2 x 11520^2 fp32 = 2.1 GB). The decode streams: its
    second chunk peaks no higher than its first, but for the first chunk the caller still holds.
    """
    _, _, results, _ = group2
    ranks = {int(r): rec for r, rec in results["1080p"].items()}
    print("\n1080p 20 s, sp=2:", {r: {k: v for k, v in rec.items() if k != "chunks"} for r, rec in ranks.items()})
    for rank, rec in ranks.items():
        assert rec["latent_shape"] == [1, 4, 40, 270, 480] and rec["tokens"] == 11520
        for phase in ("sample_mb", "chunk1_mb", "chunk2_mb"):
            assert rec[phase] <= HD_PEAK_BOUND_MB, (rank, phase, rec[phase])
        # streaming: the second chunk costs what the first did, plus the first one (uint8, 25 MB)
        # that the caller still holds on rank 0
        assert rec["chunk2_mb"] <= rec["chunk1_mb"] + 40, rec
    chunks = ranks[0]["chunks"]
    assert [c[:2] for c in chunks] == [[[1, 3, 4, 1080, 1920], "torch.uint8"]] * 2
    assert all(c[2] > 1 for c in chunks)  # frames, not a constant


@pytest.mark.parametrize("layout,guidance,match", [
    (ParallelConfig(tp=4), None, r"tp=4 must divide the heads \(2\)"),
    (ParallelConfig(sp=2, tp=2, ulysses=2), None, r"ulysses=2 must divide sp=2 and the heads per tp rank \(1\)"),
    (ParallelConfig(cfg=2), 1.0, "cfg=2 needs classifier-free guidance"),
    (ParallelConfig(sp=2, cfg=2), None, "needs 4 ranks, the group has 2"),
])
def test_unworkable_layouts_are_refused(layout, guidance, match):
    world = 2 if "ranks" in match else layout.world_size
    with pytest.raises(ParallelConfigError, match=match) as e:
        check_layout(layout, model_config().dit, world, guidance)
    assert "\n" not in str(e.value)


def test_sp_beyond_heads_is_ring():
    # 2 heads: sp=8 is 2-way Ulysses x 4-way ring; with tp=2 (one head per rank), all ring
    assert check_layout(ParallelConfig(sp=8), model_config().dit, 8) == (2, 4)
    assert check_layout(ParallelConfig(sp=4, tp=2), model_config().dit, 8) == (1, 4)


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
