"""Wan transformer steps on a GPU at the real 1.3B and 14B shapes: seconds per step, peak memory, MFU.

    python bench/gpu_wan.py                                  # 1.3B and 14B, 832x480x81, CFG, bf16
    python bench/gpu_wan.py --configs wan2.1-1.3b --steps 5
    python bench/gpu_wan.py --tiny                            # the same code path on CPU, small sizes

Random weights (`bench/wan_folder.py`'s transformer configs), built directly on the device in bf16
(the modules diffusers keeps in fp32 stay fp32), so nothing is downloaded and a 14B step fits one
80 GB GPU. One step of a clip with classifier-free guidance is the transformer on a batch of two
(cond and uncond) at the clip's latent size: 832x480x81 is 21 x 60 x 104 latents, 32,760 tokens
after the 1x2x2 patch. Text is 512 tokens of random states (the text encoder is not timed).

MFU counts the matrix FLOPs of one step (projections, attention scores and values, cross-attention,
FFN; 2 FLOPs a multiply-add) over the measured time, against the GPU's dense bf16 peak (`--peak-tflops`;
989 for an H100 SXM, the figure NVIDIA publishes; pass yours). Prints one JSON line per config.
Figures belong in docs/SCALING.md only as measured, with the card named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXT_TOKENS = 512


def step_flops(cfg: dict, tokens: int, batch: int) -> float:
    """Matrix FLOPs of one transformer forward on `batch` clips of `tokens` latent tokens."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, layers, s, t = cfg["ffn_dim"], cfg["num_layers"], tokens, TEXT_TOKENS
    per_layer = (2 * s * 4 * d * d          # self-attention q, k, v, out
                 + 2 * 2 * s * s * d        # scores and values
                 + 2 * 2 * s * d * d        # cross-attention q, out
                 + 2 * 2 * t * d * d        # cross-attention k, v over the text
                 + 2 * 2 * s * t * d        # cross-attention scores and values
                 + 2 * 2 * s * d * f)       # FFN
    return float(batch * layers * per_layer)


def run(name: str, a, device) -> dict:
    import torch
    from diffusers import WanTransformer3DModel

    from bench.wan_folder import transformer_config

    cfg = transformer_config(name, text_dim=4096 if not a.tiny else 64)
    width, height, frames = (64, 64, 9) if a.tiny else (a.width, a.height, a.frames)
    lat = (1 + (frames - 1) // 4, height // 8, width // 8)
    tokens = lat[0] * (lat[1] // 2) * (lat[2] // 2)
    dtype = torch.float32 if a.tiny else torch.bfloat16
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype on the device (no fp32 copy, no .to() cast)
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**cfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []  # as from_pretrained(torch_dtype=bf16) keeps them
    for n, param in model.named_parameters():
        if any(part in keep for part in n.split(".")):
            param.data = param.data.float()
    batch = 2 if a.cfg else 1
    x = torch.randn(batch, 16, *lat, device=device, dtype=dtype)
    text = torch.randn(batch, TEXT_TOKENS, cfg["text_dim"], device=device, dtype=dtype)
    t = torch.full((batch,), 999, device=device, dtype=torch.long)

    def step():
        with torch.inference_mode():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(a.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / a.steps
    flops = step_flops(cfg, tokens, batch)
    out = {"config": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "size": f"{width}x{height}x{frames}", "tokens": tokens, "cfg": a.cfg, "dtype": str(dtype),
           "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
           "seconds_per_step": round(seconds, 4), "tflops_per_step": round(flops / 1e12, 2),
           "achieved_tflops": round(flops / seconds / 1e12, 1)}
    if device.type == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["mfu"] = round(flops / seconds / (a.peak_tflops * 1e12), 3)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["wan2.1-1.3b", "wan2.1-14b"])
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-cfg", dest="cfg", action="store_false", help="one pass per step, not two")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    p.add_argument("--tiny", action="store_true", help="small shapes on CPU: checks the script, measures nothing")
    a = p.parse_args(argv)

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not a.tiny:
        p.error("no CUDA device: pass --tiny to check the script on CPU")
    configs = ["small"] if a.tiny else a.configs
    for name in configs:
        print(json.dumps(run(name, a, device)), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
