"""Peak memory per rank of a Wan replica at 1920x1088 x 20 s, as the group grows: 1, 2 and 4 ranks on this CPU (gloo).

    python bench/wan_memory.py [--ranks 1 2 4] [--chunks 3] [--width 128] [--patch 8] [--together]

The clip is Wan 2.1's at 1080p: 20 s at 16 fps = 321 frames, latents (1, 16, 81, 136, 240) (the real VAE's
8x space, 4x time, 16 channels; 1080 padded to 1088), sampled in windows of 81 frames (21 latent frames,
models/wan/windows.py). The modules are diffusers' own at tiny widths, random weights: a one-layer
`WanTransformer3DModel` (4 heads, `--width` channels, 1 x `--patch` x `--patch` patches, so a window is
21 x 17 x 30 = 10,710 tokens at the default 8 and its attention runs in seconds here; the real 1 x 2 x 2 would
be 171,360) and an `AutoencoderKLWan` of base_dim 4 (the real one has 96), at diffusers' tile settings
(256-pixel tiles every 192: 6 x 10 = 60 tiles a frame).

Each group is that many real processes (this file with --rank), joined over gloo as a render replica's ranks
are. Every rank holds the whole clip's latents (fp32, 170 MB) and, per phase, records its peak resident
memory (Linux VmHWM, reset just before; glibc's mmap threshold pinned at 64 KiB so freed tensors leave the
resident set, as bench/scaling.py measures the default model):

* sample: one guided step (CFG) of the transformer over one window under sp = ranks (Ulysses USP,
  models/wan/parallel.py), the window's latents held to the window before (`ContextHold`);
* decode chunk k: the k-th chunk (one latent frame) of `WanTiledDecoder` over the whole clip's latents, its
  60 tiles dealt to the ranks (each keeps the causal caches of its own tiles) and all-gathered for the blend;
  the frames of earlier chunks are kept (uint8), as the generator keeps them.

Times are wall seconds on a shared machine, for orientation only. Prints a JSON record per group and the
Markdown table docs/SCALING.md holds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).parent)]

from scaling import _hwm_mb, _rss_mb  # noqa: E402  (bench/scaling.py's VmHWM and VmRSS readers)

FRAMES, HEIGHT, WIDTH, FPS = 321, 1088, 1920, 16  # Wan 2.1 at 1080p, 20 s
WINDOW_LATENTS, CONTEXT_LATENTS = 21, 5


def build(args):
    """The tiny transformer and VAE (same weights on every rank)."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    torch.manual_seed(0)
    heads = 4
    transformer = WanTransformer3DModel(patch_size=(1, args.patch, args.patch), num_attention_heads=heads,
                                        attention_head_dim=args.width // heads, in_channels=16, out_channels=16,
                                        text_dim=32, freq_dim=32, ffn_dim=4 * args.width, num_layers=1).eval()
    torch.manual_seed(1)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return transformer.requires_grad_(False), vae.requires_grad_(False)


def rank_main(args) -> None:
    import numpy as np
    import torch
    import torch.distributed as dist
    from diffusers import UniPCMultistepScheduler

    from models.config import LayerWidths, ParallelConfig
    from models.parallel import build_mesh, init_distributed
    from models.wan.parallel import guided_prediction, parallelize_wan
    from models.wan.vae_decode import WanTiledDecoder
    from models.wan.windows import ContextHold

    torch.set_num_threads(1)
    init_distributed(args.rank, args.world, "127.0.0.1", args.port, backend="gloo")
    transformer, vae = build(args)
    mesh = None
    if args.world > 1:
        heads = 4
        mesh = build_mesh(ParallelConfig(sp=args.world), LayerWidths(heads, args.width, 4 * args.width),
                          guidance=5.0)
        parallelize_wan(transformer, mesh)
    h, w = HEIGHT // 8, WIDTH // 8
    latents_t = (FRAMES - 1) // 4 + 1
    gen = torch.Generator().manual_seed(2)
    clip = torch.randn(1, 16, latents_t, h, w, generator=gen)  # the whole clip's latents, as sampled so far
    window = torch.randn(1, 16, WINDOW_LATENTS, h, w, generator=gen)
    cond, uncond = torch.randn(1, 512, 32, generator=gen), torch.randn(1, 512, 32, generator=gen)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(50)
    scheduler.set_begin_index(0)
    t = scheduler.timesteps[0]
    record = {"rank": args.rank, "world": args.world, "latent_shape": list(clip.shape),
              "tokens": WINDOW_LATENTS * (h // args.patch) * (w // args.patch)}
    with torch.inference_mode():
        dist.barrier()
        before = _rss_mb()
        _hwm_mb(reset=True)
        t0 = time.perf_counter()
        hold = ContextHold(clip[:, :, 16:16 + CONTEXT_LATENTS], window, scheduler)
        x = hold.before_step(window.clone(), t)
        pred = guided_prediction(transformer, x, t.expand(1), cond, uncond, 5.0, mesh)
        window = scheduler.step(pred, t, x, return_dict=False)[0]
        record.update(sample_s=time.perf_counter() - t0, rss_before_mb=before, sample_peak_mb=_hwm_mb())
        del x, pred
        decoder = WanTiledDecoder(vae, dist.group.WORLD if args.world > 1 else None, chunk=1)
        record["tiles"] = len(decoder.tiles(h, w))
        frames = np.empty((FRAMES, HEIGHT, WIDTH, 3), dtype=np.uint8)  # pages touched only as chunks land
        chunks = decoder.iter_decode(clip)
        for k in range(args.chunks):
            dist.barrier()
            _hwm_mb(reset=True)
            t0 = time.perf_counter()
            start, video = next(chunks)
            frames[start:start + video.shape[2]] = ((video[0].permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()
            del video
            record[f"chunk{k}_s"] = time.perf_counter() - t0
            record[f"chunk{k}_peak_mb"] = _hwm_mb()
    records = [None] * args.world
    dist.all_gather_object(records, record)
    if args.rank == 0:
        Path(args.out, "records.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


def start_group(args, world: int, out: Path) -> list[subprocess.Popen]:
    """The `world` rank processes of one group, started."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    common = [f"--width={args.width}", f"--patch={args.patch}", f"--chunks={args.chunks}"]
    return [subprocess.Popen([sys.executable, __file__, *common, f"--rank={r}", f"--world={world}",
                              f"--port={port}", f"--out={out}"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]


def finish_group(procs: list[subprocess.Popen], out: Path) -> list[dict]:
    """The group's per-rank records, once its processes are done."""
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a rank failed:\n" + "\n".join(log[-3000:] for log in logs))
    return json.loads((out / "records.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--chunks", type=int, default=3, help="decode chunks (latent frames) measured")
    p.add_argument("--width", type=int, default=128, help="the transformer's channels (4 heads)")
    p.add_argument("--patch", type=int, default=8, help="the transformer's spatial patch size")
    p.add_argument("--together", action="store_true", help="run the groups at the same time")
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--out")
    args = p.parse_args()
    if args.rank is not None:
        return rank_main(args)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as root:
        outs = {world: Path(root, str(world)) for world in args.ranks}
        groups = {}
        for world in args.ranks:  # all at once with --together (peaks are per process; times then overlap)
            outs[world].mkdir()
            groups[world] = start_group(args, world, outs[world])
            if not args.together:
                groups[world] = finish_group(groups[world], outs[world])
        for world in args.ranks:
            records = groups[world] if not args.together else finish_group(groups[world], outs[world])
            print(json.dumps(records), flush=True)
            rows.append((world, records))
    print(f"\n| ranks | tiles / rank | sample: peak RSS / rank (MB) | decode chunk 1..{args.chunks - 1}: "
          f"peak RSS / rank (MB) | sample (s) | decode chunk (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for world, records in rows:
        tiles = records[0]["tiles"]
        sample = max(r["sample_peak_mb"] for r in records)
        sample_s = max(r["sample_s"] for r in records)
        chunks = range(1, args.chunks)  # the first chunk's peak holds one-off allocations; none with --chunks 0/1
        decode = f"{max(r[f'chunk{k}_peak_mb'] for r in records for k in chunks):.0f}" if chunks else "-"
        chunk_s = f"{max(r[f'chunk{k}_s'] for r in records for k in chunks):.1f}" if chunks else "-"
        print(f"| {world} | {-(-tiles // world)} | {sample:.0f} | {decode} | {sample_s:.1f} | {chunk_s} |")


if __name__ == "__main__":
    main()
