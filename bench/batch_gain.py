"""What batching gains a render replica by itself: `generate_together` of N same-shape clips against the same
clips one by one (`generate`), seconds per clip, on this machine's CPU or a GPU.

    python bench/batch_gain.py                        # default model, 8 and 4 clips, 1 thread (a CPU replica)
    python bench/batch_gain.py --device cuda          # where a GPU is lent: the batch a GPU replica samples

One by one runs before and after the batch (both printed), so a drift of the machine shows. Serving's
batcher (`reel serve --max-batch-size`) can gain at most this per clip; the rest of a clip's cost (H.264,
the request's hops) is not batched. docs/THROUGHPUT.md has the figures. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (default: a CPU replica's, 1)")
    p.add_argument("--clips", type=int, nargs="+", default=[8, 4])
    a = p.parse_args()

    import torch

    from models.interface import RenderRequest, load_generator

    torch.set_num_threads(a.threads)
    gen = load_generator(a.model, device=a.device)
    limits = gen.limits
    frames = limits.frames_at_least(round(limits.default_seconds * limits.default_fps))
    requests = [RenderRequest(caption=f"A red circle moves right, take {i}.", width=limits.default_width,
                              height=limits.default_height, frames=frames, fps=limits.default_fps, seed=i,
                              steps=limits.default_steps, guidance=limits.default_guidance)
                for i in range(max(a.clips))]
    gen.generate(requests[:1])  # warm: lazy loads, kernel choices
    gen.generate_together(requests[:2])

    def per_clip(fn, n: int) -> float:
        t0 = time.perf_counter()
        fn(requests[:n])
        return (time.perf_counter() - t0) / n

    rows = []
    for n in a.clips:
        before, together, after = per_clip(gen.generate, n), per_clip(gen.generate_together, n), \
            per_clip(gen.generate, n)
        rows.append({"clips": n, "one_by_one_s_per_clip": [round(before, 3), round(after, 3)],
                     "together_s_per_clip": round(together, 3),
                     "saved_per_clip": round(1 - together / min(before, after), 3)})
    print(json.dumps({"model": a.model, "device": str(gen.device) if hasattr(gen, "device") else a.device,
                      "threads": a.threads, "size": f"{limits.default_width}x{limits.default_height}x{frames}",
                      "steps": limits.default_steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
