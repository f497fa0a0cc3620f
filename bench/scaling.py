"""Per-rank memory of one DiT replica as the group grows: group sizes 1, 2 and 4 on this CPU (gloo).

    python bench/scaling.py [--frames 4] [--size 64] [--layers 2] [--hidden 256] [--heads 8]

For each layout (1; sp2, tp2; sp4, tp4, sp2 x tp2) it starts that many real processes, joins them
(gloo + DeepSpeed comm, as a render replica), builds the same random DiT on each, shards it with
`models.parallel.parallelize`, and runs one guided forward (a [cond; uncond] batch of 2) over a
latent of `frames` x `size` x `size` (4 channels, 1x2x2 patches). Per rank it reports:

* weights: bytes of the parameters this rank holds after sharding (exact);
* activations: peak resident memory during the forward above the resident memory before it
  (Linux VmHWM, reset just before; glibc's mmap threshold pinned at 64 KiB so that freed tensors
  leave the resident set), i.e. the activations, the all-to-all and ring buffers and the full
  input/output latents that every rank holds;
* the forward's wall time (this machine is shared, 2 cores: times are for orientation only).

It prints the table that docs/SCALING.md holds, and the max abs difference of each layout's
velocity from the single-process one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = [("1 (reference)", 1, 1), ("sp2", 2, 1), ("tp2", 1, 2), ("sp4", 4, 1), ("tp4", 1, 4), ("sp2 x tp2", 2, 2)]


def _hwm_mb(reset: bool = False) -> float:
    status = Path("/proc/self/status").read_text()
    hwm = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return hwm


def _rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


def model_config(args):
    from models.config import load_config

    return load_config("tiny", overrides={"dit": {"hidden_size": args.hidden, "num_heads": args.heads,
                                                  "num_layers": args.layers, "mlp_ratio": 4.0}})


def inputs(args, cfg):
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.vae.latent_channels, args.frames, args.size, args.size, generator=g)
    text = torch.randn(2, 16, cfg.text.dim, generator=g)
    mask = torch.ones(2, 16, dtype=torch.bool)
    return x, torch.tensor([0.6, 0.6]), text, mask


def rank_main(args) -> None:
    import torch
    import torch.distributed as dist

    from models.config import ParallelConfig
    from models.dit import VideoDiT
    from models.parallel import build_mesh, init_distributed, parallelize

    torch.set_num_threads(1)
    cfg = model_config(args)
    init_distributed(args.rank, args.world, "127.0.0.1", args.port, backend="gloo")
    mesh = build_mesh(ParallelConfig(sp=args.sp, tp=args.tp), cfg.dit)
    torch.manual_seed(0)
    dit = parallelize(VideoDiT(cfg.dit).eval(), mesh)
    weights = sum(p.numel() * p.element_size() for p in dit.parameters()) / 2**20
    x, t, text, mask = inputs(args, cfg)
    dist.barrier()
    with torch.no_grad():
        before = _rss_mb()
        _hwm_mb(reset=True)
        t0 = time.perf_counter()
        v = dit(x, t, text, mask)
        seconds = time.perf_counter() - t0
        peak = _hwm_mb()
    record = {"rank": args.rank, "weights_mb": weights, "activation_mb": peak - before, "seconds": seconds}
    records = [None] * args.world
    dist.all_gather_object(records, record)
    if args.rank == 0:
        torch.save(v, Path(args.out) / "v.pt")
        Path(args.out, "records.json").write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


def run_layout(args, sp: int, tp: int, out: Path) -> list[dict]:
    world = sp * tp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    common = [f"--{k}={getattr(args, k)}" for k in ("frames", "size", "layers", "hidden", "heads")]
    procs = [subprocess.Popen([sys.executable, __file__, *common, f"--rank={r}", f"--world={world}", f"--sp={sp}",
                               f"--tp={tp}", f"--port={port}", f"--out={out}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a rank failed:\n" + "\n".join(log[-2000:] for log in logs))
    return json.loads((out / "records.json").read_text())


# --- predicted figures (no GPU here: all of this is arithmetic, not measurement) --------------------

H100 = {"bf16_flops": 989e12, "mfu_gemm": 0.6, "mfu_attn": 0.5, "nvlink_GBps": 350.0, "ib_GBps": 40.0,
        "gpus_per_node": 8, "hbm_GB": 80}
# 1080p x 20 s at 24 fps: 480 frames through a production-style VAE (8x8 space, 4x time, 16 channels;
# 1080 padded to 1088) and 1x2x2 patches: 120 x 68 x 120 tokens.
CLIP = {"frames": 480, "height": 1088, "width": 1920, "vae_s": 8, "vae_t": 4, "latent_ch": 16, "patch": (1, 2, 2),
        "text_tokens": 512}
CONFIGS = {  # this repo's block (self-attn, cross-attn, MLP x4, adaLN per block): 22 D^2 per layer
    "1B-class": {"hidden": 1536, "heads": 12, "layers": 20},
    "10B-class": {"hidden": 4096, "heads": 32, "layers": 28},
}


def layout_for(n: int, heads: int, gpus_per_node: int = 8) -> tuple[int, int, int, int]:
    """(cfg, sp, tp, ulysses) we would pick for n GPUs: CFG first (no traffic but one gather per
    step), then sequence parallelism with the Ulysses part inside a node (all-to-all on NVLink) and
    the ring across nodes (P2P, overlapped with attention); tp = 1 (weights fit; TP's all-reduces
    cost more than they save here)."""
    if n == 1:
        return 1, 1, 1, 1
    cfg, sp = 2, n // 2
    u = max(d for d in range(1, min(sp, gpus_per_node) + 1) if sp % d == 0 and heads % d == 0)
    return cfg, sp, 1, u


def predict(cfg_name: str, n: int, hw=H100, clip=CLIP) -> dict:
    c = CONFIGS[cfg_name]
    d, heads, layers = c["hidden"], c["heads"], c["layers"]
    pt, ph, pw = clip["patch"]
    t_lat = clip["frames"] // clip["vae_t"]
    h_lat, w_lat = clip["height"] // clip["vae_s"], clip["width"] // clip["vae_s"]
    tokens = (t_lat // pt) * (h_lat // ph) * (w_lat // pw)
    m = clip["text_tokens"]
    params = 22 * d * d * layers
    # FLOPs of one forward of one sample (2 per multiply-add): per-token linears (self-attn q/k/v/out,
    # cross-attn q/out, MLP: 14 D^2 weights), self-attention (QK^T and PV: 4 N^2 D), cross-attention
    gemm = 2 * 14 * d * d * tokens * layers
    attn = 4 * tokens * tokens * d * layers + 4 * tokens * m * d * layers
    step_flops = 2 * (gemm + attn)  # classifier-free guidance: two passes per step
    cfg, sp, tp, u = layout_for(n, heads, hw["gpus_per_node"])
    ring = sp // u
    batch = 2 // cfg  # samples per rank per forward
    local = tokens / sp
    bytes_ = 2  # bf16
    weights_gb = params * bytes_ / tp / 1e9
    # live activations inside one block at inference: x, its normed copy and a residual (3 D), and
    # q, k, v, rotated q/k, attention out, the MLP's 4D hidden and its GELU (~8 D, split by tp)
    act_gb = batch * local * (3 * d + 8 * d / tp) * bytes_ / 1e9
    latents_gb = 6 * clip["latent_ch"] * t_lat * h_lat * w_lat * 4 / 1e9  # fp32 sampler state, every rank
    # Ulysses: q, k, v, out all-to-all; each rank sends (u-1)/u of a (local x D/tp) tensor per call
    a2a_bytes = 4 * batch * local * (d / tp) * bytes_ * (u - 1) / u if u > 1 else 0.0
    # ring: K and V of a ring block (u·local tokens, D/(tp·u) wide) passed ring-1 times
    ring_bytes = 2 * batch * (u * local) * (d / tp / u) * bytes_ * (ring - 1) if ring > 1 else 0.0
    t_compute = step_flops / n / hw["bf16_flops"] * (gemm / (gemm + attn) / hw["mfu_gemm"]
                                                    + attn / (gemm + attn) / hw["mfu_attn"])
    nvlink, ib = hw["nvlink_GBps"] * 1e9, hw["ib_GBps"] * 1e9
    ulysses_net = nvlink if u <= hw["gpus_per_node"] else ib
    ring_net = nvlink if sp <= hw["gpus_per_node"] else ib
    t_a2a = layers * a2a_bytes / ulysses_net  # one forward per step per rank (batch 2, or 1 with cfg=2)
    attn_per_layer = t_compute * (attn / (gemm + attn)) / layers
    t_ring_exposed = layers * max(0.0, ring_bytes / ring_net - attn_per_layer)
    t_step = t_compute + t_a2a + t_ring_exposed
    return {"config": cfg_name, "gpus": n, "layout": f"cfg{cfg} x sp{sp} (ulysses {u} x ring {ring}) x tp{tp}",
            "tokens": tokens, "params_B": params / 1e9, "step_PFLOP": step_flops / 1e15,
            "attn_share": attn / (gemm + attn), "weights_GB": weights_gb, "act_GB": act_gb, "latents_GB": latents_gb,
            "a2a_MB_layer": a2a_bytes / 1e6, "ring_MB_layer": ring_bytes / 1e6, "t_compute_s": t_compute,
            "t_a2a_s": t_a2a, "t_ring_exposed_s": t_ring_exposed, "t_step_s": t_step,
            "fits": weights_gb + act_gb + latents_gb <= hw["hbm_GB"]}


def print_predictions() -> None:
    hw = H100
    print(f"PREDICTED (arithmetic, no measurement): 1080p x 20 s, 24 fps; H100 SXM bf16 {hw['bf16_flops'] / 1e12:.0f} "
          f"TFLOP/s dense at MFU {hw['mfu_gemm']:.0%} (GEMM) / {hw['mfu_attn']:.0%} (attention); NVLink "
          f"{hw['nvlink_GBps']:.0f} GB/s, InfiniBand {hw['ib_GBps']:.0f} GB/s per GPU; one step = 2 forwards (CFG)\n")
    print("| config | GPUs | layout | tokens | PFLOP / step | attention share | weights / rank (GB) | "
          "activations / rank (GB) | all-to-all / layer / rank (MB) | ring P2P / layer / rank (MB) | "
          "fits 80 GB | step (s): compute + all-to-all + exposed ring = total | 50 steps (min) |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |")
    for name in CONFIGS:
        for n in (1, 8, 16, 64):
            p = predict(name, n)
            print(f"| {name} ({p['params_B']:.2f} B) | {n} | {p['layout']} | {p['tokens']:,} | {p['step_PFLOP']:.0f} | "
                  f"{p['attn_share']:.0%} | {p['weights_GB']:.1f} | {p['act_GB']:.1f} | {p['a2a_MB_layer']:.0f} | "
                  f"{p['ring_MB_layer']:.0f} | {'yes' if p['fits'] else 'no'} | {p['t_compute_s']:.1f} + "
                  f"{p['t_a2a_s']:.2f} + {p['t_ring_exposed_s']:.2f} = {p['t_step_s']:.1f} | "
                  f"{50 * p['t_step_s'] / 60:.1f} |")
    print(f"\nlatents (fp32 sampler state, ~6 copies, on every rank): {predict('1B-class', 1)['latents_GB']:.1f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--sp", type=int, default=1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    ap.add_argument("--predict", action="store_true", help="print only the predicted GPU table (arithmetic)")
    args = ap.parse_args()
    if args.rank is not None:
        return rank_main(args)
    if args.predict:
        return print_predictions()

    import torch

    tokens = args.frames * (args.size // 2) ** 2
    print(f"DiT width {args.hidden}, {args.heads} heads, {args.layers} layers, MLP x4; latent 4x{args.frames}x"
          f"{args.size}x{args.size}, {tokens} tokens, batch 2 (guided), fp32; one forward per layout; "
          f"machine: {os.cpu_count()}-core CPU, gloo")
    rows, ref = [], None
    for name, sp, tp in LAYOUTS:
        with tempfile.TemporaryDirectory(prefix="scaling") as tmp:
            recs = run_layout(args, sp, tp, Path(tmp))
            v = torch.load(Path(tmp) / "v.pt")
        ref = v if ref is None else ref
        rows.append({"layout": name, "ranks": sp * tp, "weights_mb": max(r["weights_mb"] for r in recs),
                     "activation_mb": max(r["activation_mb"] for r in recs),
                     "seconds": max(r["seconds"] for r in recs), "max_abs_diff": (v - ref).abs().max().item()})
        print(f"  {name}: done", file=sys.stderr, flush=True)
    base = rows[0]
    print("\n| layout | ranks | weights / rank (MB) | peak activations / rank (MB) | vs 1 rank | forward (s) "
          "| max abs diff vs 1 rank |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        total = r["weights_mb"] + r["activation_mb"]
        print(f"| {r['layout']} | {r['ranks']} | {r['weights_mb']:.1f} | {r['activation_mb']:.0f} | "
              f"{total / (base['weights_mb'] + base['activation_mb']):.2f} | {r['seconds']:.1f} | "
              f"{r['max_abs_diff']:.1e} |")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
