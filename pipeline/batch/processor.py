"""The processor of `reel render`: the stages a clip passes through, each with the resources it runs
under, and the stream of rows through them.

    recaption (CPU actor) → (inputs, CPU actor) → render (replicas: GPU or CPU actors) → write (CPU actor)

(with `--disaggregate`, render is text → sample → decode: `pipeline/stages/apart.py`)

`build_stages` sizes the render replicas from the cluster (`pipeline.stages.replica.replica_resources`
gives the per-replica defaults), `stream` runs the rows through the stages on Ray Data and yields
them as they come out, `clip_item` is the row a validated clip starts as.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from models.interface import GridLimits, ParallelConfig, ParallelConfigError
from pipeline.batch.manifest import ClipSpec
from pipeline.errors import UsageError
from pipeline.media.provenance import C2paConfig
from pipeline.prompt.recaption import LLM_PREFIXES
from pipeline.stages.apart import DecodeUDF, TextStatesUDF
from pipeline.stages.base import FusedUDF, Stage
from pipeline.stages.inputs import InputsUDF
from pipeline.stages.prompt import RecaptionUDF
from pipeline.stages.render import RenderUDF
from pipeline.stages.write import WriteUDF


def render_layout(model: str, parallel: dict[str, int]) -> ParallelConfig:
    """The render replicas' layout (the model's, overridden by `parallel`'s degrees); a layout that
    cannot work is a UsageError (one line), raised before Ray starts."""
    from models.interface import model_layout

    unknown = sorted(set(parallel) - {"sp", "tp", "cfg"})
    if unknown:
        raise UsageError(f"unknown parallel degree(s) {', '.join(unknown)} (allowed: sp, tp, cfg)")
    try:
        return model_layout(model, **parallel)
    except ParallelConfigError as e:
        raise UsageError(str(e)) from None


def render_placement_prefix(run_id: str) -> str:
    """The name prefix of a run's render placement groups (one per group replica)."""
    return f"reelforge-render-{run_id}-"


def build_stages(*, model_spec: str, recaptioner: str, policy: str | None, out: str, model: dict[str, str],
                 run_id: str, blur_faces: bool = False, c2pa: C2paConfig | None = None, codec: str = "h264",
                 layout: ParallelConfig | None = None, clips: int | None = None,
                 inputs_limits: GridLimits | None = None, replicas: int | None = None,
                 gpus_per_replica: float | None = None, cpus_per_replica: float | None = None,
                 threads_per_replica: int | None = None, dtype: str | None = None,
                 offload: bool = False, compile: bool = False, fuse: bool | None = None,
                 disaggregate: bool = False, stage_gpus: float = 0.0) -> list[Stage]:
    """The processor: recaption → (inputs) → render → write, each with the resources it runs under.

    `model_spec` is the model to load (with `dtype`, `offload` and `compile`: `load_generator`'s), `model` its
    name/version/weights hash for the metadata, `codec` the videos' (the writer's); the replica
    settings are `reel render`'s (None: the defaults below). The inputs stage (reading and fitting
    the rows' pictures and clips) is there when `inputs_limits` is given: when some row has media.

    With GPUs: one replica per `gpus_per_replica` GPUs, each reserving one CPU. On a CPU-only
    cluster: single-threaded replicas, one per core, each reserving half a CPU. Measured on a
    2-core machine, two 1-thread replicas render 1.3x the clips per second of one 2-thread
    replica: a small DiT's ops are too short for two threads to share well, and any other
    process on the machine stalls a multi-threaded replica at every op.

    A `layout` of more than one rank makes each replica a group (pipeline/stages/replica.py): the render
    actor reserves `HOST_CPUS` and no GPU and starts its ranks in a placement group of its own,
    one bundle per rank holding the replica's CPUs and GPUs (1 GPU + 1 CPU a rank with GPUs;
    without, the replica's 0.5 CPU split over them), named after the run and the actor. One
    replica per `world` GPUs, or one without GPUs: a CPU group already runs a process per rank.

    `fuse` (None: when the replicas are single-rank CPU replicas and the recaptioner is not an LLM)
    runs the light stages inside the render replicas, one `FusedUDF` stage: on a machine of a few
    cores, separate light actors only take cores, start-up and object-store copies from the
    replicas (measured: docs/THROUGHPUT.md). GPU replicas keep them apart, so a GPU only samples.

    `disaggregate` runs text encoding and VAE decoding in actor pools of their own (`pipeline/stages/apart.py`),
    each actor reserving `stage_gpus` GPUs (0: a CPU actor) and loading only its part of the model; the render
    replicas load the DiT without the text encoder and only sample. Off by default: it pays where the text
    encoder or the decode does not fit beside the DiT, or where another device is free to decode while the DiT
    samples (docs/THROUGHPUT.md); on CPUs every stage competes for the same cores.
    """
    import ray
    from ray.data import ActorPoolStrategy

    from pipeline.stages.replica import HOST_CPUS, layout_name, rank_bundle, replica_resources

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    world = layout.world_size if layout is not None else 1
    use_gpus = bool(gpus) if gpus_per_replica is None else bool(gpus_per_replica)
    cpus_per_replica, gpus_per_replica = replica_resources(world, use_gpus, cpus_per_replica, gpus_per_replica)
    threads = threads_per_replica if threads_per_replica is not None else (None if gpus_per_replica else 1)
    if disaggregate and fuse:
        raise UsageError("--disaggregate runs the text and decode stages in pools of their own: it cannot fuse them "
                         "into the render replicas")
    if not replicas:
        if gpus_per_replica:  # the text and decode pools' first actors take their GPUs first
            replicas = max(1, int((gpus - (2 * stage_gpus if disaggregate else 0)) // gpus_per_replica))
        else:
            replicas = max(1, int(resources.get("CPU", 1) // threads)) if world == 1 else 1
    if clips:
        replicas = min(replicas, clips)
    if world == 1:
        check_replica_fits(gpus_per_replica, cpus_per_replica)
    render = {"model": model_spec, "num_threads": threads, "dtype": dtype, "offload": offload, "compile": compile,
              **({"disaggregated": True} if disaggregate else {})}
    render_resources = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    if world > 1:  # the ranks reserve the devices; the render actor only drives them
        try:
            bundle = rank_bundle(world, bool(gpus_per_replica), cpus_per_replica, gpus_per_replica)
        except ValueError as e:
            raise UsageError(str(e)) from None
        short = [k for k, v in bundle.items() if v * world > resources.get(k, 0)]
        if short:
            raise UsageError(f"a render replica of {world} ranks ({layout_name(layout)}) needs "
                             + ", ".join(f"{bundle[k] * world:g} {k}" for k in short) + "; the Ray cluster has "
                             + ", ".join(f"{resources.get(k, 0):g} {k}" for k in short))
        render.update(parallel=layout, rank_bundle=bundle, placement_prefix=render_placement_prefix(run_id))
        render_resources = {"num_cpus": HOST_CPUS, "num_gpus": 0}
    # Small fractional CPUs for the light stages: on a 2-core machine whole-CPU actors starve
    # Ray Data's own read and output tasks and the job deadlocks (docs/PIPELINE.md, "Resources on small
    # machines").
    def light() -> dict[str, Any]:
        return {"compute": ActorPoolStrategy(size=1), "num_cpus": 0.25}

    stages = [
        Stage(RecaptionUDF, {"recaptioner": recaptioner, "policy": policy}, light()),
        *([Stage(InputsUDF, {"limits": inputs_limits}, light())] if inputs_limits is not None else []),
        Stage(RenderUDF, render,
              {"compute": ActorPoolStrategy(min_size=1, max_size=replicas, initial_size=replicas), "batch_size": 1,
               # Ray Data restarts a replica that dies (node lost, OOM kill) and retries its
               # clip (max_restarts=-1, max_task_retries=-1 are its defaults for actor pools);
               # a group replica comes back into its placement group and starts its ranks again.
               **render_resources}),
        Stage(WriteUDF, {"out": out, "model": model, "run_id": run_id, "blur_faces": blur_faces, "c2pa": c2pa,
                         "codec": codec}, light()),
    ]
    if disaggregate:
        part = {"model": model_spec, "num_threads": threads, "dtype": dtype}

        def pool() -> dict[str, Any]:
            return {"compute": ActorPoolStrategy(min_size=1, max_size=replicas), "num_cpus": 1 if stage_gpus else 0.25,
                    "num_gpus": stage_gpus}

        at = next(i for i, s in enumerate(stages) if s.udf is RenderUDF)
        stages[at:at + 1] = [Stage(TextStatesUDF, part, pool()), stages[at], Stage(DecodeUDF, part, pool())]
        return stages
    if fuse is None:
        fuse = not gpus_per_replica and world == 1 and not recaptioner.startswith(LLM_PREFIXES)
    if fuse:
        replica = next(s for s in stages if s.udf is RenderUDF)
        return [Stage(FusedUDF, {"stages": [(s.udf, s.constructor_kwargs) for s in stages]},
                      replica.map_batches_kwargs)]
    return stages


def check_replica_fits(gpus: float | None, cpus: float | None) -> None:
    """UsageError (one line) when no node of the Ray cluster has the GPUs or CPUs one render
    replica asks for: Ray would keep its actor pending for ever and the run would hang."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    short = [f"{need:g} {kind} (the largest node has {max((n.get(kind, 0) for n in nodes), default=0):g})"
             for kind, need in (("GPU", gpus), ("CPU", cpus))
             if need and not any(n.get(kind, 0) >= need for n in nodes)]
    if short:
        raise UsageError("a render replica needs " + " and ".join(short) + "; lower --gpus-per-replica / "
                         "--cpus-per-replica, or run on a cluster that has them")


def clip_item(spec: ClipSpec, request_sha256: str, passthrough: bytes) -> dict[str, Any]:
    """A validated clip as the row the stages pass along (the online endpoint builds the same); its LoRA
    adapters as JSON text [{uri, scale}]."""
    item = {k: v for k, v in asdict(spec).items() if k != "passthrough"}
    item.update(request_sha256=request_sha256, passthrough=passthrough, caption="", recaptioner="",
                timings="{}", error="", stage="", video_uri="", frames_data=b"", frames_shape="",
                shots=json.dumps(item["shots"]) if item["shots"] else "", shot_captions="", shot_records="",
                inputs=b"", dtype="", lora_records="", text_states=b"", latents=b"",
                lora=json.dumps([{"uri": a[0], "scale": a[1]} for a in item["lora"]]) if item["lora"] else "")
    return item


def stream(items: list[dict[str, Any]], stages: list[Stage], progress: bool = True) -> Iterator[dict[str, Any]]:
    """The rows through the stages on Ray Data (one block per clip), yielded as they come out,
    under one progress bar of our own that counts clips (`progress`: shown on stderr)."""
    import ray
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one bar of our own, counting clips
    ctx.print_on_execution_start = False
    _quiet_ray_data_console()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    for stage in stages:
        ds = stage.apply(ds)
    failed = 0
    with tqdm(total=len(items), unit="clip", desc="rendering", disable=not progress, file=sys.stderr) as bar:
        for row in ds.iter_rows():
            failed += bool(row.get("error"))
            bar.update(1)
            bar.set_postfix(failed=failed, refresh=False)
            yield row


def _quiet_ray_data_console() -> None:
    """Ray Data's INFO lines and its "progress bars disabled" notice stay in its log file
    (ray-data.log in the session folder); the terminal shows our bar and warnings."""
    data_logger = logging.getLogger("ray.data")
    for handler in data_logger.handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
