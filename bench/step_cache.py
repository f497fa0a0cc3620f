"""The step cache and --compile on the default model, side by side in one process: sampling seconds.

    python bench/step_cache.py [--clips 6] [--thresholds 0.1 0.2 0.3] [--threads 1] [--compile]

Renders `--clips` fresh shapes-world scenes (canonical captions, the model's default 20 steps and
guidance, 2 s 64x64) once without the cache and once per threshold, interleaved clip by clip so that
the machine's load drifts alike for all; prints, per setting, the median sampling seconds (the
generator's own "sample" timing: the DiT steps, not the text encoder or the VAE), the speed-up over
uncached, the mean steps computed and the largest frame difference. `--compile` adds the uncached
render with torch.compile'd blocks (compiled in a warm-up render first). Adherence is `reel eval
--scenes N --step-cache T`'s (docs/SCALING.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=6)
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default="default")
    p.add_argument("--compile", action="store_true", help="also the uncached render with compiled blocks")
    a = p.parse_args(argv)

    import numpy as np

    from models.interface import RenderRequest, load_generator
    from models.shapes.world import canonical_caption, sample_scenes

    gen = load_generator(a.model, num_threads=a.threads)
    compiled = load_generator(a.model, num_threads=a.threads, compile=True) if a.compile else None
    rng = np.random.default_rng(7)
    requests = [RenderRequest(caption=canonical_caption(s), width=64, height=64, frames=16, fps=8,
                              seed=int(rng.integers(0, 2 ** 31 - 1)), steps=gen.limits.default_steps,
                              guidance=gen.limits.default_guidance) for s in sample_scenes(rng, a.clips)]
    settings = {"uncached": (gen, None), **{f"step_cache {t:g}": (gen, t) for t in a.thresholds}}
    if compiled is not None:
        t0 = time.perf_counter()
        compiled.generate(requests[:1])
        print(f"compile (first render): {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        settings["compiled"] = (compiled, None)
    gen.generate(requests[:1])  # warm-up
    seconds = {k: [] for k in settings}
    computed = {k: [] for k in settings}
    diff = {k: 0 for k in settings}
    for r in requests:
        base = None
        for name, (g, threshold) in settings.items():
            out = g.generate([dataclasses.replace(r, step_cache=threshold)])[0]
            seconds[name].append(out.timings["sample"])
            computed[name].append(out.steps_computed if out.steps_computed is not None else r.steps)
            base = out.frames if base is None else base
            diff[name] = max(diff[name], int(np.abs(out.frames.astype(int) - base).max()))
    uncached = statistics.median(seconds["uncached"])
    for name in settings:
        med = statistics.median(seconds[name])
        print(json.dumps({"setting": name, "clips": a.clips, "sample_s_median": round(med, 3),
                          "speedup": round(uncached / med, 2), "steps_computed_mean": statistics.mean(computed[name]),
                          "max_frame_diff": diff[name]}), flush=True)


if __name__ == "__main__":
    main()
