"""`reel render`: a manifest in, videos + metadata + errors + run.json out, on Ray Data.

    read + validate (driver) → recaption (CPU actors) → render (GPU/CPU actors) → encode + write (CPU)

The driver reads the manifest (exact row numbers, duplicate ids, a one-line error when the
manifest itself is unusable), drops rows whose outputs already exist with the same request hash
(resume), and streams the rest through the stages; the first MP4 lands while later clips are
still being sampled. Exit codes: 0 all rendered or skipped, 3 some rows failed, 2 unusable input.
The stages and their resources are the processor's (`pipeline.batch.processor`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from models.interface import ParallelConfig
from pipeline import storage
from pipeline.batch.manifest import ClipSpec, ManifestError, RowError, read_manifest, validate
from pipeline.batch.processor import build_stages, clip_item, render_layout, render_placement_prefix, stream
from pipeline.errors import EXIT_OK, EXIT_ROWS_FAILED, UsageError, UserError, one_line
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
    codec: str = "h264"  # the videos' codec: h264 (MP4) or ffv1 (a lossless RGB master in Matroska)
    # the layout of a render replica over several devices: "sp", "tp", "cfg" (1 or 2) given here
    # override the model config's `parallel` section; more than one rank makes each replica a
    # group of Ray actors, one per rank (pipeline/stages/replica.py)
    parallel: dict[str, int] = field(default_factory=dict)
    dtype: str | None = None  # the model's precision (float32, bfloat16, float16); None: bf16 on GPUs, fp32 on CPUs
    offload: bool = False  # a Wan folder's text encoder and idle expert on the CPU between uses
    fuse: bool | None = None  # light stages inside the render replicas; None: on CPU-only runs (build_stages)

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


def render_manifest(cfg: RenderConfig) -> RunSummary:
    started = dt.datetime.now(dt.timezone.utc)
    t_start = time.perf_counter()
    run_id = started.strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
    summary = RunSummary(run_id)

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
    summary.rows, summary.errors = table.num_rows, list(errors)
    hashes = {s.id: s.request_sha256(model_sha256=model_info.weights_sha256, recaptioner=recaptioner,
                                     codec=cfg.codec, dtype=cfg.dtype) for s in specs}
    done = _completed_requests(cfg.out) if cfg.resume else {}
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
        items = [clip_item(s, hashes[s.id], passthrough_bytes(s.passthrough, passthrough_schema)) for s in todo]
        stages = build_stages(
            model_spec=cfg.model, recaptioner=recaptioner, policy=cfg.policy, out=cfg.out, model=model,
            run_id=run_id, blur_faces=cfg.blur_faces, c2pa=c2pa, codec=cfg.codec, layout=layout, clips=len(items),
            inputs_limits=limits if any(_has_media(s) for s in todo) else None, replicas=cfg.replicas,
            gpus_per_replica=cfg.gpus_per_replica, cpus_per_replica=cfg.cpus_per_replica,
            threads_per_replica=cfg.threads_per_replica, dtype=cfg.dtype, offload=cfg.offload, fuse=cfg.fuse)
        try:
            for row in stream(items, stages, cfg.progress):
                if row.get("error"):
                    summary.errors.append(RowError(int(row["row"]), row["id"], row["stage"], row["error"]))
                else:
                    summary.rendered += 1
        finally:
            if layout.world_size > 1:  # the render actors' placement groups outlive them
                from pipeline.stages.replica import remove_placement_groups

                remove_placement_groups(render_placement_prefix(run_id))

    summary.failed = len(summary.errors)
    summary.exit_code = EXIT_ROWS_FAILED if summary.failed else EXIT_OK
    summary.wall_seconds = time.perf_counter() - t_start
    _write_errors(cfg.out, summary)
    _write_run_json(cfg, summary, started, model, recaptioner, layout)
    return summary


def _has_media(spec: ClipSpec) -> bool:
    return bool(spec.image or spec.image_end or spec.video or spec.video_end)


def _completed_requests(out: str) -> dict[str, str]:
    """id → request hash of every clip whose metadata (written last) exists under `out`."""
    table = storage.read_parquet_dataset(storage.join(out, "metadata"), columns=["id", "request_sha256"])
    if table is None:
        return {}
    return dict(zip(table.column("id").to_pylist(), table.column("request_sha256").to_pylist()))


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


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # A local Ray for this run: no dashboard, an object store sized for clips not datasets.
        # address="local": a new one even when `ray start` left a cluster on this machine (plain
        # ray.init() would join that one, and refuse the object store size).
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ray.init(address="local", include_dashboard=False, object_store_memory=min(2 << 30, int(total * 0.3)),
                 logging_level=logging.WARNING, log_to_driver=False)


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
