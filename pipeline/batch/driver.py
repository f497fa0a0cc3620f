"""`reel render`: a manifest in, videos + metadata + errors + run.json out, on Ray Data.

    read + validate (driver) → recaption (CPU actors) → render (GPU/CPU actors) → encode + write (CPU)

The driver reads the manifest (exact row numbers, duplicate ids, a one-line error when the
manifest itself is unusable), drops rows whose outputs already exist with the same request hash
(resume), and streams the rest through the stages; the first MP4 lands while later clips are
still being sampled. Exit codes: 0 all rendered or skipped, 3 some rows failed, 2 unusable input.
The stages and their resources are the processor's (`pipeline.batch.processor`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from models.interface import ParallelConfig
from pipeline import storage
from pipeline.batch.local_ray import init_ray
from pipeline.batch.manifest import ClipSpec, ManifestError, RowError, read_manifest, validate
from pipeline.batch.processor import build_stages, clip_item, render_layout, render_placement_prefix, stream
from pipeline.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED, UsageError, UserError, one_line
from pipeline.media.provenance import ProvenanceError, c2pa_config_from_env
from pipeline.stages.metadata import passthrough_bytes
from pipeline.stages.write import check_codec

ERRORS_SCHEMA = pa.schema([
    ("row", pa.int64()), ("id", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
    ("run_id", pa.string()),
])


@dataclass
class RenderConfig:
    manifest: str
    out: str
    model: str = "default"
    recaptioner: str | None = None  # None: the model's own (config `recaptioner`), else "plain"
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else a local Ray started here
    limit: int | None = None
    resume: bool = True
    replicas: int | None = None  # render replicas; None: one per GPU, or one per core without GPUs
    gpus_per_replica: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_replica: float | None = None  # CPUs a replica reserves; None: 1 with GPUs, 0.5 without
    threads_per_replica: int | None = None  # torch threads per replica; None: 1 on CPU replicas
    progress: bool = True
    policy: str | None = None  # the safety policy (file/URI); None: the shipped one; "none": off
    blur_faces: bool = False  # blur faces in every clip (a row's blur_faces also asks for it)
    step_cache: float | None = None  # the step cache's threshold for rows that give none; None: off
    codec: str = "h264"  # the videos' codec: h264 (MP4) or ffv1 (a lossless RGB master in Matroska)
    # the layout of a render replica over several devices: "sp", "tp", "cfg" (1 or 2) given here
    # override the model config's `parallel` section; more than one rank makes each replica a
    # group of Ray actors, one per rank (pipeline/stages/replica.py)
    parallel: dict[str, int] = field(default_factory=dict)
    dtype: str | None = None  # the model's precision (float32, bfloat16, float16); None: bf16 on GPUs, fp32 on CPUs
    offload: bool = False  # a Wan folder's text encoder and idle expert on the CPU between uses
    compile: bool = False  # torch.compile the DiT's blocks (frames equal to rounding; not in the request)
    fuse: bool | None = None  # light stages inside the render replicas; None: on CPU-only runs (build_stages)
    disaggregate: bool = False  # text encoding and VAE decoding in actor pools of their own (pipeline/stages/apart.py)
    stage_gpus: float = 0.0  # with disaggregate: GPUs each text / decode actor reserves (0: CPU actors)

    def __post_init__(self):
        self.out = storage.absolute(self.out)  # the metadata's URIs must not depend on the cwd


@dataclass
class RunSummary:
    run_id: str
    rows: int = 0
    rendered: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[RowError] = field(default_factory=list)
    exit_code: int = EXIT_OK
    wall_seconds: float = 0.0
    startup_seconds: float = 0.0
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM: the counts are what finished before it
    report_error: str | None = None  # why errors/ and run.json could not be written (the store is down)


def render_manifest(cfg: RenderConfig) -> RunSummary:
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.perf_counter()
    run_id = started.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
    summary = RunSummary(run_id)
    check_options(cfg)

    try:
        table = read_manifest(cfg.manifest)
    except ManifestError as e:
        raise UsageError(str(e)) from None
    if cfg.limit is not None:
        table = table.slice(0, cfg.limit)
    from models.interface import check_load_options, describe_model

    try:
        model_info, limits, model_recaptioner = describe_model(cfg.model)
    except Exception as e:
        raise UsageError(f"cannot load model {cfg.model!r}: {one_line(e)}") from None
    if cfg.step_cache is not None and not cfg.step_cache >= 0:
        raise UsageError(f"--step-cache {cfg.step_cache:g}: the threshold must be 0 or more")
    try:
        check_load_options(cfg.model, cfg.dtype, cfg.offload)
    except UserError as e:
        raise UsageError(str(e)) from None
    recaptioner = cfg.recaptioner or model_recaptioner or "plain"
    _check_recaptioner(recaptioner)
    layout = render_layout(cfg.model, cfg.parallel)
    _check_policy(cfg.policy)
    try:
        c2pa = c2pa_config_from_env()  # the driver's REEL_C2PA_* settings, handed to the writers
        check_codec(cfg.codec, c2pa)
    except (ProvenanceError, ValueError) as e:
        raise UsageError(str(e)) from None
    model = {"name": model_info.name, "version": model_info.version, "weights_sha256": model_info.weights_sha256}

    specs, errors = validate(table, limits)
    if cfg.blur_faces:  # run-wide blurring changes the frames: it is part of each clip's request
        specs = [dataclasses.replace(s, blur_faces=True) for s in specs]
    if cfg.step_cache is not None:  # run-wide step cache: the rows that set none take the run's threshold
        specs = [s if s.step_cache is not None else dataclasses.replace(s, step_cache=cfg.step_cache) for s in specs]
    summary.rows, summary.errors = table.num_rows, list(errors)
    hashes = {s.id: s.request_sha256(model_sha256=model_info.weights_sha256, recaptioner=recaptioner,
                                     codec=cfg.codec, dtype=cfg.dtype) for s in specs}
    _check_out_readable(cfg.out)
    done = _completed_requests(cfg.out, cfg) if cfg.resume else {}
    todo = [s for s in specs if done.get(s.id) != hashes[s.id]]
    summary.skipped = len(specs) - len(todo)
    if summary.skipped:
        _say(f"skipping {summary.skipped} clip(s) already rendered with the same parameters", cfg)

    if todo:
        t_ray = time.perf_counter()
        init_ray(cfg.address)
        summary.startup_seconds = time.perf_counter() - t_ray
        check_output_reachable(cfg.out)
        passthrough_schema = pa.schema([f for f in table.schema if f.name in todo[0].passthrough])
        # rows grouped by their LoRA adapters (manifest order within a group): a replica loads a group's
        # adapters once and changes them between groups, not from one row to the next
        items = [clip_item(s, hashes[s.id], passthrough_bytes(s.passthrough, passthrough_schema))
                 for s in sorted(todo, key=lambda s: s.adapter_key)]
        stages = build_stages(
            model_spec=cfg.model, recaptioner=recaptioner, policy=cfg.policy, out=cfg.out, model=model,
            run_id=run_id, blur_faces=cfg.blur_faces, c2pa=c2pa, codec=cfg.codec, layout=layout, clips=len(items),
            inputs_limits=limits if any(_has_media(s) for s in todo) else None, replicas=cfg.replicas,
            gpus_per_replica=cfg.gpus_per_replica, cpus_per_replica=cfg.cpus_per_replica,
            threads_per_replica=cfg.threads_per_replica, dtype=cfg.dtype, offload=cfg.offload, compile=cfg.compile,
            fuse=cfg.fuse, disaggregate=cfg.disaggregate, stage_gpus=cfg.stage_gpus)
        try:
            with _stop_signals():
                for row in stream(items, stages, cfg.progress):
                    if row.get("error"):
                        summary.errors.append(RowError(int(row["row"]), row["id"], row["stage"], row["error"]))
                    else:
                        summary.rendered += 1
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: record what finished (a rerun resumes), then stop
            summary.interrupted = True
            # what the writers finished, also clips whose rows had not reached this loop yet (a store gone
            # down meanwhile leaves the count of rows that reached it: run.json is still written, or said why not)
            try:
                finished = _completed_requests(cfg.out)
                summary.rendered = sum(finished.get(s.id) == hashes[s.id] for s in todo)
            except UsageError:
                pass
        finally:
            if layout.world_size > 1:  # the render actors' placement groups outlive them
                from pipeline.stages.replica import remove_placement_groups

                remove_placement_groups(render_placement_prefix(run_id))

    summary.failed = len(summary.errors)
    summary.exit_code = (EXIT_INTERRUPTED if summary.interrupted
                         else EXIT_ROWS_FAILED if summary.failed else EXIT_OK)
    summary.wall_seconds = time.perf_counter() - t_start
    with _stop_signals(ignore=True):  # a second Ctrl-C must not cut errors/ or run.json short
        try:
            _write_errors(cfg.out, summary)
            _write_run_json(cfg, summary, started, model, recaptioner, layout)
        except Exception as e:  # the store went away mid-run: the reasons go to stderr instead, all of them
            summary.report_error = f"cannot write errors/ and run.json to {cfg.out}: {one_line(e, show_type=True)}"
            summary.exit_code = EXIT_ROWS_FAILED
    return summary


@contextlib.contextmanager
def _stop_signals(ignore: bool = False):
    """While clips render, SIGINT and SIGTERM (a scheduler stopping the job) raise KeyboardInterrupt,
    also where the shell started the run in the background with SIGINT ignored; with `ignore`, they
    are ignored (while the run's record is written). Restored after; only in the main thread (the
    only one Python lets set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, signal.SIG_IGN if ignore else stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_options(cfg: RenderConfig) -> None:
    """The run's numbers and output, checked before anything starts (UsageError, one line): a
    replica count, thread count or CPU share that cannot work would otherwise hang Ray Data or
    fail deep in torch, and an OUT that is an existing file fails only at the first write."""
    for name, value, low in (("--replicas", cfg.replicas, 1), ("--threads", cfg.threads_per_replica, 1),
                             ("--limit", cfg.limit, 0)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be {low} or more, got {value}")
    for name, value, zero_ok in (("--cpus-per-replica", cfg.cpus_per_replica, False),
                                 ("--gpus-per-replica", cfg.gpus_per_replica, True),
                                 ("--stage-gpus", cfg.stage_gpus, True)):
        if value is not None and not (value > 0 or (zero_ok and value == 0)):  # NaN fails too
            raise UsageError(f"{name} must be {'0 or ' if zero_ok else ''}a positive number, got {value:g}")
    if cfg.stage_gpus and not cfg.disaggregate:
        raise UsageError("--stage-gpus is for the text and decode stages of --disaggregate; add --disaggregate")
    if storage.is_local(cfg.out) and os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} is an existing file; name a folder (it is created when missing)")


def _has_media(spec: ClipSpec) -> bool:
    return bool(spec.image or spec.image_end or spec.video or spec.video_end)


def _check_out_readable(out: str) -> None:
    """An output store that cannot be reached is a UsageError (exit 2) before anything renders, with or
    without resume."""
    try:
        storage.check_reachable(out)
    except Exception as e:  # botocore, aiohttp, OSError: whatever the store's client raises
        raise UsageError(f"cannot read --out {out}: {one_line(e, show_type=True)}") from None


def _completed_requests(out: str, cfg: RenderConfig | None = None) -> dict[str, str]:
    """id → request hash of every clip complete under `out`: its metadata (written last) exists and so
    do its files, the video (or still) with the byte count the metadata recorded. A video deleted or
    truncated under kept metadata is not complete: the clip renders again (said on stderr when `cfg` is
    given). The sizes come from one listing per folder, so checking costs no request per clip. A store
    that cannot be read is a UsageError."""
    columns = ["id", "request_sha256", "video_uri", "image_uri", "thumbnail_uri", "bytes"]
    try:
        table = storage.read_parquet_dataset(storage.join(out, "metadata"), columns=columns)
        if table is None:
            return {}
        listed = {folder: storage.list_sizes(storage.join(out, folder))
                  for folder in ("videos", "images", "thumbnails")}
    except Exception as e:  # botocore, aiohttp, OSError, pyarrow: whatever the store's client raises
        raise UsageError(f"cannot read --out {out}: {one_line(e, show_type=True)}") from None
    done, broken = {}, 0
    for row in table.to_pylist():
        media = row["video_uri"] or row["image_uri"] or ""
        folder = "videos" if row["video_uri"] else "images"
        size = listed[folder].get(media.rsplit("/", 1)[-1])
        thumbnail = (row["thumbnail_uri"] or "").rsplit("/", 1)[-1]
        if size is not None and size == row["bytes"] and thumbnail in listed["thumbnails"]:
            done[row["id"]] = row["request_sha256"]
        else:
            broken += 1
    if broken and cfg is not None:
        _say(f"{broken} clip(s) have metadata but a missing or truncated video, still or thumbnail: "
             "rendering them again", cfg)
    return done


def _write_errors(out: str, summary: RunSummary) -> None:
    """errors/ lists the rows that failed in the latest run (a fresh dataset each run)."""
    prefix = storage.join(out, "errors")
    rows = [{**asdict(e), "run_id": summary.run_id} for e in sorted(summary.errors, key=lambda e: e.row)]
    storage.write_parquet_atomic(storage.join(prefix, "errors.parquet"),
                                 pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA))
    for name in storage.list_names(prefix):
        if name != "errors.parquet":
            storage.delete(storage.join(prefix, name))


def _write_run_json(cfg: RenderConfig, summary: RunSummary, started: dt.datetime, model: dict, recaptioner: str,
                    layout: ParallelConfig) -> None:
    versions = {}
    for dist in ("reelforge", "ray", "torch", "deepspeed", "transformers", "pyarrow"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    storage.write_json_atomic(storage.join(cfg.out, "run.json"), {
        "run_id": summary.run_id,
        "manifest": cfg.manifest,
        "out": cfg.out,
        "counts": {"rows": summary.rows, "rendered": summary.rendered, "skipped": summary.skipped,
                   "failed": summary.failed},
        "exit_code": summary.exit_code,
        "interrupted": summary.interrupted,
        "model": model,
        "recaptioner": recaptioner,
        "parallel": asdict(layout),  # the replicas' layout, the model's and cfg.parallel's together
        "config": asdict(cfg),
        "versions": versions,
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "wall_seconds": round(summary.wall_seconds, 3),
        "ray_startup_seconds": round(summary.startup_seconds, 3),
    })


def check_output_reachable(out: str) -> None:
    """Workers on every node write outputs: a plain path only works when the cluster is one node.
    A `file://` URI says the path is shared (every node mounts it)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if "://" not in out and len(nodes) > 1:
        raise UsageError(f"--out {out} is a node-local path but the Ray cluster has {len(nodes)} nodes; "
                         f"use shared storage: s3://…, gs://…, or file://{os.path.abspath(out)} "
                         "if every node mounts it")


def _check_recaptioner(spec: str) -> None:
    from pipeline.prompt.recaption import check_recaptioner_spec

    try:
        check_recaptioner_spec(spec)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _check_policy(spec: str | None) -> None:
    from pipeline.prompt.safety.policy import PolicyError, load_policy

    try:
        load_policy(spec)
    except PolicyError as e:
        raise UsageError(str(e)) from None


def _say(msg: str, cfg: RenderConfig) -> None:
    print(msg, file=sys.stderr)
