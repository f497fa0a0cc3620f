"""Two figures of the default model on this machine: seconds per 2 s 64x64 clip, and the peak
memory of `reel render` on the examples.

    python bench/render_clip.py [--clips 8] [--threads 2] [--model default] [--no-memory]

* clip time: `load_generator(model)` once, then `--clips` renders of a 2 s, 8 fps, 64x64 clip at
  the model's default steps and guidance, one at a time (what one user waits for); median and
  max after one warm-up render. Target: <= 5 s on a 2-core CPU.
* peak memory: `reel render examples/spring.parquet` into a temporary folder, its whole process
  tree (the CLI, Ray's raylet, GCS and workers) sampled every 0.2 s; the peak of the summed
  resident set (RSS; shared pages counted once per process, so this over-states). Target: <= 4 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def clip_seconds(model: str, clips: int, threads: int) -> dict:
    from models.interface import RenderRequest, load_generator
    from models.shapes.world import Scene, canonical_caption

    gen = load_generator(model, device="cpu", num_threads=threads)
    lim = gen.limits
    caption = canonical_caption(Scene("circle", "red", "black", "right"))
    req = dict(caption=caption, width=64, height=64, fps=8, frames=16,
               steps=lim.default_steps, guidance=lim.default_guidance)
    gen.generate([RenderRequest(seed=0, **req)])  # warm-up
    times = []
    for seed in range(1, clips + 1):
        t0 = time.perf_counter()
        gen.generate([RenderRequest(seed=seed, **req)])
        times.append(time.perf_counter() - t0)
    return {"model": f"{gen.info.name} {gen.info.version}", "steps": lim.default_steps, "threads": threads,
            "clips": clips, "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}


def render_peak_memory(manifest: str) -> dict:
    import psutil

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        command = [sys.executable, "-m", "pipeline.cli", "render", manifest, "--out", out, "--no-progress"]
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            rss = 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak = max(peak, rss)
            time.sleep(0.2)
        err = proc.stderr.read()
        if proc.returncode != 0:
            raise SystemExit(f"reel render failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
        clips = len(os.listdir(os.path.join(out, "videos")))
    return {"manifest": manifest, "clips": clips, "wall_s": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(peak / 1e9, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--manifest", default=str(ROOT / "examples" / "spring.parquet"))
    p.add_argument("--no-memory", dest="memory", action="store_false")
    a = p.parse_args()
    result = {"cpu_count": os.cpu_count(), "clip": clip_seconds(a.model, a.clips, a.threads)}
    print(json.dumps(result["clip"]), flush=True)
    if a.memory:
        result["render"] = render_peak_memory(a.manifest)
        print(json.dumps(result["render"]), flush=True)


if __name__ == "__main__":
    main()
