"""reelforge's Wan path against diffusers' `WanPipeline`: seconds per clip on the same folder.

    .venv/bin/python bench/wan_vs_diffusers.py                     # small random Wan, CPU
    .venv/bin/python bench/wan_vs_diffusers.py --size 320x192 --frames 33 --steps 20 --clips 5

Both render the same requests from the same random-weight folder (`bench/wan_folder.py`): diffusers
through `WanPipeline.from_pretrained(folder)(...)`, reelforge through `models.interface.load_generator`
(`WanVideoGenerator`, the generator `reel render` runs). The runs alternate (diffusers, ours, ...)
after one warm-up each, so a slow spell of the machine hits both. Prints the medians, their ratio
(ours / diffusers: at most 1.0 means the wrapping costs nothing) and the largest frame difference in
uint8 levels (0 expected: the same maths).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="small", help="bench/wan_folder.py config (default: %(default)s)")
    p.add_argument("--size", default="160x96", help="WIDTHxHEIGHT (default: %(default)s)")
    p.add_argument("--frames", type=int, default=33, help="4k+1 (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--clips", type=int, default=3, help="timed clips per side after a warm-up")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    import numpy as np
    import torch
    from diffusers import WanPipeline

    from bench.wan_folder import build
    from models.interface import RenderRequest, load_generator
    from models.wan.generator import frames_to_uint8

    torch.set_num_threads(a.threads)
    width, height = (int(v) for v in a.size.split("x"))
    prompt, negative = "a red ball moves right on a sunny beach", "blurry static"
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, f"Wan-{a.config}")
        build(folder, a.config)
        pipe = WanPipeline.from_pretrained(folder).to(a.device)
        pipe.set_progress_bar_config(disable=True)
        ours = load_generator(folder, device=a.device)

        def diffusers_clip(seed: int) -> np.ndarray:
            out = pipe(prompt=prompt, negative_prompt=negative, height=height, width=width, num_frames=a.frames,
                       num_inference_steps=a.steps, guidance_scale=a.guidance, output_type="np",
                       generator=torch.Generator("cpu").manual_seed(seed)).frames[0]
            return frames_to_uint8(out)

        def reelforge_clip(seed: int) -> np.ndarray:
            request = RenderRequest(prompt, width, height, a.frames, 16, seed, a.steps, a.guidance,
                                    negative_caption=negative)
            return ours.generate([request])[0].frames

        times: dict[str, list[float]] = {"diffusers": [], "reelforge": []}
        diff = 0
        for i in range(a.clips + 1):
            frames = {}
            for name, fn in (("diffusers", diffusers_clip), ("reelforge", reelforge_clip)):
                t0 = time.perf_counter()
                frames[name] = fn(seed=i)
                if i:  # the first clip of each side warms up
                    times[name].append(time.perf_counter() - t0)
            diff = max(diff, int(np.abs(frames["diffusers"].astype(int) - frames["reelforge"].astype(int)).max()))
    med = {k: statistics.median(v) for k, v in times.items()}
    summary = {"config": a.config, "size": a.size, "frames": a.frames, "steps": a.steps, "guidance": a.guidance,
               "clips": a.clips, "threads": a.threads, "device": a.device,
               "seconds_per_clip": {k: round(v, 3) for k, v in med.items()},
               "ratio_reelforge_over_diffusers": round(med["reelforge"] / med["diffusers"], 3),
               "max_frame_difference_levels": diff}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
