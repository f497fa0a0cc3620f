"""Benchmark: the Ray Data pipeline against a bare Python loop over the same generator and rows.

    python bench/pipeline_vs_loop.py [--rows 64] [--model default] [--apart] [--disaggregate]

Both sides recaption, sample, encode and write every row to a local folder. The pipeline's time
counts everything after `ray.init` (actor start-up and model load included); the loop's counts
its model load too. Ray's own start-up is printed apart. Target: pipeline ≥ 0.9 × loop.
`pace` says where each side's time went: the first clip's arrival (model loads, actor start-up)
and the steady clips per second after it (from the metadata files' times).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = ["circle", "square", "triangle", "diamond"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "white"]
MOTIONS = ["moves left", "moves right", "moves up", "moves down", "stays still", "grows", "shrinks"]
BACKGROUNDS = ["black", "gray", "navy", "brown"]


def manifest_rows(n: int) -> list[dict]:
    return [{"id": f"bench-{i:03d}",
             "prompt": f"a {COLOURS[i % 7]} {SHAPES[i % 4]} {MOTIONS[(i // 4) % 7]} on {BACKGROUNDS[(i // 2) % 4]}"}
            for i in range(n)]


def bare_loop(manifest: str, out: str, model: str) -> float:
    from models.interface import RenderRequest, describe_model, load_generator
    from pipeline.batch.manifest import read_manifest, validate
    from pipeline.prompt.recaption import load_recaptioner
    from pipeline.stages.write import ClipWriter

    t0 = time.perf_counter()
    info, limits, recaptioner_name = describe_model(model)
    specs, _ = validate(read_manifest(manifest), limits)
    generator = load_generator(model)
    recaptioner = load_recaptioner(recaptioner_name or "plain")
    labels = {"name": info.name, "version": info.version, "weights_sha256": info.weights_sha256}
    writer = ClipWriter(out, labels, "bench")
    for s in specs:
        caption = recaptioner.recaption(s.prompt, s.seed)
        request = RenderRequest(caption, s.width, s.height, s.frames, s.fps, s.seed, s.steps, s.guidance)
        out = generator.generate([request])[0]
        row = {"id": s.id, "row": s.row, "prompt": s.prompt, "caption": caption, "recaptioner": recaptioner.name,
               "mode": s.mode, "seed": s.seed, "fps": s.fps, "steps": s.steps, "guidance": s.guidance,
               "request_sha256": "", "timings": json.dumps(out.timings)}
        writer.write(row, out.frames)
    return time.perf_counter() - t0


def pace(out: str, start: float, seconds: float) -> dict[str, float]:
    """Where a side's time went: the first clip's arrival (start-up: model loads, actor starts)
    and the clips per second after it (the steady pace), from the metadata files' times."""
    done = sorted(p.stat().st_mtime - start for p in Path(out, "metadata").glob("*.parquet"))
    steady = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else float("nan")
    return {"first_clip_s": round(done[0], 2), "steady_clips_per_s": round(steady, 3),
            "last_clip_s": round(done[-1], 2), "total_s": round(seconds, 2)}


class CpuMeter:
    """CPU seconds spent by this process and everything it started (Ray's raylet, GCS and workers,
    their ffmpeg children), by process title, sampled every half second while running: where a
    side's CPU went, which on a shared machine says more than its wall time does."""

    def __init__(self):
        import threading

        import psutil

        self.me = psutil.Process()
        self.seen: dict[int, tuple[str, float]] = {}
        self.base = self._own()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _own(self) -> float:
        t = self.me.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def _sample(self) -> None:
        import psutil

        for proc in self.me.children(recursive=True):
            try:
                t = proc.cpu_times()
                title = " ".join(proc.cmdline()[:1]) or proc.name()
            except psutil.Error:
                continue
            title = title.rsplit("/", 1)[-1]
            for kind in ("RecaptionUDF", "InputsUDF", "RenderUDF", "WriteUDF", "default_worker"):
                if kind in title:
                    title = kind
            self.seen[proc.pid] = (title, t.user + t.system + t.children_user + t.children_system)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            self._sample()

    def done(self) -> dict[str, float]:
        self._sample()
        self.stop.set()
        self.thread.join()
        totals: dict[str, float] = {"driver": self._own() - self.base}
        for title, seconds in self.seen.values():
            totals[title] = totals.get(title, 0.0) + seconds
        totals = {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v >= 0.05}
        return {"total": round(sum(totals.values()), 1), **totals}


def stage_medians(out: str) -> dict[str, float]:
    """Median seconds per stage over the clips written under `out` (from their metadata)."""
    from pipeline import storage

    metadata = storage.read_parquet_dataset(storage.join(out, "metadata"), columns=["timings"])
    timings = metadata.column("timings").to_pylist()
    return {k: round(statistics.median(t[k] for t in timings if t[k] is not None), 3)
            for k in timings[0] if any(t[k] is not None for t in timings)}


def pipeline(manifest: str, out: str, model: str, replicas: int | None, threads: int | None,
             cpus: float | None, **options) -> tuple[float, float]:
    import ray

    from pipeline.batch.driver import RenderConfig, render_manifest

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False)
    startup = time.perf_counter() - t0
    t1 = time.perf_counter()
    summary = render_manifest(RenderConfig(manifest, out, model=model, progress=False, replicas=replicas,
                                           threads_per_replica=threads, **options,
                                           **({"cpus_per_replica": cpus} if cpus else {})))
    elapsed = time.perf_counter() - t1
    assert summary.rendered == summary.rows, summary.errors[:3]
    ray.shutdown()
    return elapsed, startup


def one_round(tmp: str, manifest: str, args: argparse.Namespace, n: int) -> dict:
    """The loop, then the pipeline, on the same rows; their times, paces and stage medians."""
    loop_out, pipe_out = f"{tmp}/loop{n}", f"{tmp}/pipeline{n}"
    loop_start, meter = time.time(), CpuMeter()
    loop_s = bare_loop(manifest, loop_out, args.model)
    loop_cpu, meter = meter.done(), CpuMeter()
    pipe_s, startup_s = pipeline(manifest, pipe_out, args.model, args.replicas, args.threads, args.cpus_per_replica)
    pipe_start, pipe_cpu = time.time() - pipe_s, meter.done()  # render_manifest's start (ray.init excluded)
    def variant(prefix: str, with_stages: bool = False, **options) -> dict:
        """The pipeline again with `options` (RenderConfig's), its figures under `prefix`_…"""
        variant_out, meter = f"{tmp}/{prefix}{n}", CpuMeter()
        seconds, _ = pipeline(manifest, variant_out, args.model, args.replicas, args.threads, args.cpus_per_replica,
                              **options)
        figures = {f"{prefix}_seconds": round(seconds, 2), f"ratio_{prefix}_over_loop": round(loop_s / seconds, 3),
                   f"{prefix}_pace": pace(variant_out, time.time() - seconds, seconds),
                   f"{prefix}_cpu_seconds": meter.done()}
        if with_stages:
            figures[f"{prefix}_median_stage_seconds"] = stage_medians(variant_out)
        return figures

    apart = {}
    if args.apart:  # the light stages in actors of their own, as before they were fused on CPUs
        apart.update(variant("apart", fuse=False))
    if args.disaggregate:  # text encoding and decoding in actor pools of their own (reel render --disaggregate)
        apart.update(variant("disaggregated", with_stages=True, disaggregate=True))
    return {
        "loop_seconds": round(loop_s, 2), "loop_clips_per_s": round(args.rows / loop_s, 3),
        "pipeline_seconds": round(pipe_s, 2), "pipeline_clips_per_s": round(args.rows / pipe_s, 3),
        "ratio_pipeline_over_loop": round(loop_s / pipe_s, 3), "ray_init_seconds": round(startup_s, 2),
        "pace": {"loop": pace(loop_out, loop_start, loop_s), "pipeline": pace(pipe_out, pipe_start, pipe_s)},
        "cpu_seconds": {"loop": loop_cpu, "pipeline": pipe_cpu},
        "median_stage_seconds": {"loop": stage_medians(loop_out), "pipeline": stage_medians(pipe_out)},
        **apart,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--model", default="default")
    parser.add_argument("--replicas", type=int, help="render replicas (default: reel render's)")
    parser.add_argument("--threads", type=int, help="torch threads per replica (default: reel render's)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of loop-then-pipeline (on a shared machine: compare within a round)")
    parser.add_argument("--apart", action="store_true",
                        help="also run the pipeline with the light stages in actors of their own (unfused)")
    parser.add_argument("--disaggregate", action="store_true",
                        help="also run the pipeline with text encoding and decoding in pools of their own")
    parser.add_argument("--cpus-per-replica", type=float, help="CPUs reserved per replica (default: reel render's)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = f"{tmp}/bench.parquet"
        pq.write_table(pa.Table.from_pylist(manifest_rows(args.rows)), manifest)
        rounds = [one_round(tmp, manifest, args, n) for n in range(args.repeat)]
    ratios = [r["ratio_pipeline_over_loop"] for r in rounds]
    result = {"rows": args.rows, "model": args.model, "cpus": os.cpu_count(), "rounds": rounds,
              "median_ratio_pipeline_over_loop": round(statistics.median(ratios), 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
