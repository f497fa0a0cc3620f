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
FFN; 2 FLOPs a multiply-add) over the measured time, against the dense bf16 peak of the card found
(`PEAK_BF16_TFLOPS`, NVIDIA's published figures by device name: 989 for an H100 SXM or H200, 756 for an
H100 PCIe; `--peak-tflops` for another card). Beside it, `matmul_tflops` is what one large bf16 matmul
reaches on the same device just before, and `mfu_of_matmul` the step's share of that: the ceiling the
card gives in practice. On CPU (`--tiny`) only the latter is printed (a CPU has no published bf16 peak).
The goal for a Wan-14B-size step at 832x480x81 with CFG on one H100 is an MFU of 0.6 (LightX2V publishes
5.18 s/step for the I2V-14B at 480p on one H100). `--compile`: the blocks through torch.compile
(diffusers' `compile_repeated_blocks`), compiled in the warm-up. Prints one JSON line per config.
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

#: dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by a substring of torch's device name; first match
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0))


def card_peak_tflops(device_name: str) -> float | None:
    """The published dense bf16 peak of a card by its torch device name; None for a card not listed."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def matmul_tflops(device, dtype, size: int, repeats: int) -> float:
    """What `size` x `size` matmuls in `dtype` reach on `device` (TFLOP/s): the practical ceiling."""
    import torch

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size ** 3 * repeats / (time.perf_counter() - t0) / 1e12


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

    if a.compile:
        model.compile_repeated_blocks()

    def step():
        with torch.inference_mode():
            return model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ceiling = matmul_tflops(device, dtype, 512 if a.tiny else 8192, 5 if a.tiny else 20)
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
           "seconds_per_step": round(seconds, 4), "tflops_per_step": float(f"{flops / 1e12:.4g}"),
           "achieved_tflops": round(flops / seconds / 1e12, 3), "compiled": a.compile,
           "matmul_tflops": round(ceiling, 3), "mfu_of_matmul": round(flops / seconds / 1e12 / ceiling, 3)}
    if device.type == "cuda":
        peak = a.peak_tflops or card_peak_tflops(out["device"])
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["peak_tflops"] = peak
        out["mfu"] = None if peak is None else round(flops / seconds / (peak * 1e12), 3)
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
    p.add_argument("--peak-tflops", type=float,
                   help="the GPU's dense bf16 peak (default: the card's published figure, PEAK_BF16_TFLOPS)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer's blocks")
    p.add_argument("--tiny", action="store_true",
                   help="small shapes on CPU: checks the script; MFU only against the CPU's own matmul")
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
