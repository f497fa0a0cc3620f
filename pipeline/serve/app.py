"""The Serve application: `build_app(cfg)` binds VideoAPI → Renderer; `run` is `reel serve`;
`app_from_env` is the application builder a Serve config file or RayService imports
(`pipeline.serve.app:app_from_env`), configured by REELFORGE_* variables."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

from ray import serve
from ray.serve import Application

from pipeline.errors import UsageError, UserError, one_line
from pipeline.serve.api import VideoAPI
from pipeline.serve.config import ServeConfig
from pipeline.serve.renderer import Renderer

APP_NAME = "reelforge"


def build_app(cfg: ServeConfig) -> Application:
    """The bound Serve application: VideoAPI → Renderer, resources and replicas from `cfg` (binding
    reads the model's config for its parallel layout; the weights load in the replicas). A render
    replica over several ranks is deployed with a placement group: the replica in bundle 0, its
    rank actors in the others (`pipeline.stages.replica.replica_deployment_options`)."""
    from pipeline.stages.replica import replica_deployment_options

    scaling: dict[str, Any] = {"num_replicas": cfg.replicas}
    if cfg.max_replicas:
        scaling = {"autoscaling_config": {"min_replicas": cfg.min_replicas or 1, "max_replicas": cfg.max_replicas,
                                          "target_ongoing_requests": 1}}
    layout = cfg.layout()
    group, use_gpus = layout.world_size > 1, cfg.gpus_per_replica > 0
    resources = replica_deployment_options(
        cfg.model, layout, use_gpus=use_gpus, cpus_per_replica=None if group and use_gpus else cfg.cpus_per_replica,
        gpus_per_replica=None if group else cfg.gpus_per_replica)
    renderer = Renderer.options(**scaling, max_ongoing_requests=cfg.batch_size,
                                graceful_shutdown_timeout_s=cfg.graceful_shutdown_s, **resources).bind(cfg)
    return VideoAPI.options(ray_actor_options={"num_cpus": cfg.ingress_cpus}).bind(cfg, renderer)


def run(cfg: ServeConfig, *, host: str, port: int, address: str | None) -> None:
    """`reel serve`: start (or join) Ray, deploy the app on host:port and serve until interrupted."""
    from models.interface import check_load_options, describe_model
    from pipeline.batch.driver import check_output_reachable
    from pipeline.batch.local_ray import init_ray
    from pipeline.batch.processor import check_replica_fits
    from pipeline.prompt.recaption import check_recaptioner_spec

    try:
        check_recaptioner_spec(cfg.recaptioner_for(describe_model(cfg.model)[2]))
        cfg.layout()
    except Exception as e:
        raise UsageError(f"cannot serve model {cfg.model!r}: {one_line(e)}") from None
    try:
        check_load_options(cfg.model, cfg.dtype, cfg.offload)
    except UserError as e:
        raise UsageError(str(e)) from None
    init_ray(address)
    check_output_reachable(cfg.out)
    if cfg.layout().world_size == 1:  # a replica no node can hold: refused, not pending for ever
        check_replica_fits(cfg.gpus_per_replica, cfg.cpus_per_replica)

    def stop(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, stop)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"reel serve: http://{host}:{port}/v1/videos  (model {cfg.model}, out {cfg.out}, "
              f"jobs {cfg.store_path}); Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)  # accepted jobs stay in the store for the next start


def app_from_env(args: dict[str, Any]) -> Application:
    """The application builder a Serve config file names (cluster/rayservice.yaml: `import_path:
    pipeline.serve.app:app_from_env`): `build_app` of `ServeConfig.from_env()`, read when Serve
    builds the app, where it builds it (with the application's runtime_env), not when the module is
    imported. `args` (the config's `args:`) are ServeConfig fields, e.g. {"max_queued": 16}, read as
    their REELFORGE_* variables are and winning over them ({"lora_roots": ["s3://bucket/loras/"]})."""
    names = {f.name for f in dataclasses.fields(ServeConfig)} - {"api_key_sha256"}
    unknown = sorted(set(args) - names)
    if unknown:
        raise ValueError(f"unknown args {unknown}: the args are ServeConfig fields, {sorted(names)}")
    def as_variable(value: Any) -> str:  # a list (lora_roots) as its variable's commas
        return "" if value is None else ",".join(value) if isinstance(value, list) else str(value)

    env = {**os.environ, **{f"REELFORGE_{k.upper()}": as_variable(v) for k, v in args.items()}}
    return build_app(ServeConfig.from_env(env))
