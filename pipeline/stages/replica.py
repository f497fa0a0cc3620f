"""A render replica spread over several devices: a group of Ray actors, one per rank.

    replica = ModelParallelReplica("default", ParallelConfig(sp=2, tp=2))   # 4 ranks
    [out] = replica.generate([request])   # the `VideoGenerator` interface (info, limits, precision)

How a group is placed and run:

* The layout is checked against the model (`models.interface.check_model_layout`) before anything
  starts: a layout that cannot work is refused in one line (`ParallelConfigError`).
* Its resources are a placement group of `world` = sp·tp·cfg bundles, one per rank (`rank_bundle`:
  1 GPU + 1 CPU on GPUs; a fraction of a CPU on CPUs), strategy PACK: on as few nodes as hold it,
  spilling onto more when no node can (16 ranks on 8-GPU nodes: two nodes). The actor that drives
  the group (a Ray Data render actor) reserves only `HOST_CPUS`, outside it. A replica that runs
  inside a placement group already uses that one: a Serve replica deployed with
  `replica_deployment_options` sits in bundle 0 (`HOST_CPUS`), its ranks in bundles 1..world.
* One `RenderRank` actor per rank, pinned to its bundle. Rank 0 picks a free port on its node and
  the others join it there (`init_distributed`: NCCL on GPUs, gloo on CPUs); then every rank loads
  the model as a `ParallelVideoGenerator` over that group.
* `generate` puts the requests in the object store once and sends them to every rank; every rank
  samples (its shard of the tokens, heads or CFG pass) and gets the same frames, and rank 0's are
  returned. A rank that dies, or one that fails while the others wait in a collective, brings the
  group down: its actors are started again in the same placement group and the error is raised for
  that batch (the row fails; the replica renders the next one).

The rank actors are owned by the actor that drives them and die with it; the placement group it
made does not (Ray keeps an actor's placement groups until the job ends). So a render actor names
its group (the run and its actor id: `placement_name`): restarted by Ray after a crash, it finds
the group and starts its ranks there again; the batch driver removes a run's groups by their name
prefix when the run ends (`remove_placement_groups`), a script's `shutdown` its replica's.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from models.interface import (
    ModelConfig,
    ParallelConfig,
    ParallelConfigError,
    RenderOutput,
    RenderRequest,
    check_model_layout,
    model_layout,
)

#: CPUs the actor that drives a group reserves (a Ray Data render actor, a Serve replica): it only
#: passes requests and frames, the ranks hold the devices.
HOST_CPUS = 0.1
#: Seconds the others may take to finish once one rank has failed; beyond, they are stuck in a
#: collective that will never complete, and the group is started again.
FAILED_RANK_GRACE_S = 10.0


def layout_name(layout: ParallelConfig) -> str:
    """"sp=2 x tp=1 x cfg=1", as `check_model_layout`'s messages name a layout."""
    return f"sp={layout.sp} x tp={layout.tp} x cfg={layout.cfg}"


def cfg_degree(cfg_parallel: bool | None) -> int | None:
    """--cfg-parallel / --no-cfg-parallel as the cfg degree (2 / 1); None: the model config's."""
    return None if cfg_parallel is None else 2 if cfg_parallel else 1


def replica_resources(world: int, use_gpus: bool, cpus_per_replica: float | None = None,
                      gpus_per_replica: float | None = None) -> tuple[float, float]:
    """(CPUs, GPUs) a render replica of `world` ranks reserves: the ones given, else the defaults.

    Defaults: with GPUs, 1 GPU and 1 CPU a rank (NCCL runs one process per GPU, so a rank gets
    whole GPUs); without, 0.5 CPU for the whole replica (one process or a group): fractional, so
    that on a small machine Ray keeps CPUs for the pipeline's other actors (docs/PIPELINE.md,
    "Resources on small machines"). The batch processor, the Serve deployment and `rank_bundle` all size
    their replicas here.
    """
    gpus = float(world if use_gpus else 0) if gpus_per_replica is None else float(gpus_per_replica)
    cpus = float(world if use_gpus else 0.5) if cpus_per_replica is None else float(cpus_per_replica)
    return cpus, gpus


def rank_bundle(world: int, use_gpus: bool, cpus_per_replica: float | None = None,
                gpus_per_replica: float | None = None) -> dict[str, float]:
    """What one rank of a `world`-rank replica reserves: the replica's CPUs and GPUs
    (`replica_resources`) split evenly.

    Raises ValueError (one line) for GPUs that do not split into whole GPUs per rank.
    """
    cpus, gpus = replica_resources(world, use_gpus, cpus_per_replica, gpus_per_replica)
    if use_gpus:
        per_rank = gpus / world
        if per_rank < 1 or per_rank != int(per_rank):
            raise ValueError(f"{gpus:g} GPUs per replica do not split over {world} ranks: each rank needs "
                             f"whole GPUs (NCCL runs one process per GPU); use a multiple of {world}")
        return {"CPU": cpus / world, "GPU": per_rank}
    return {"CPU": cpus / world}


def replica_deployment_options(model: str | ModelConfig, parallel: ParallelConfig | None = None,
                               use_gpus: bool = False, cpus_per_replica: float | None = None,
                               gpus_per_replica: float | None = None) -> dict[str, Any]:
    """Serve options (`Deployment.options(**...)`) for a render deployment with `parallel`'s layout.

    One rank: `ray_actor_options` with the replica's CPUs and GPUs (`replica_resources`: defaults
    1 CPU + 1 GPU with GPUs, 0.5 CPU without). More: a placement group per replica,
    `[{"CPU": HOST_CPUS}]` for the replica itself (Serve puts it in bundle 0 and captures its
    children) followed by one `rank_bundle` per rank, PACK; the replica reserves `HOST_CPUS` and no
    GPU, and its `RenderUDF(model, parallel=layout)` starts the ranks in bundles 1..world.
    `parallel`: None takes the model's (`models.interface.model_layout`; a Wan folder: one rank).
    Raises `ParallelConfigError` for a bad layout.
    """
    if parallel is None:
        layout = model_layout(model)
    else:
        layout = parallel
        check_model_layout(model, layout)
    world = layout.world_size
    if world == 1:
        cpus, gpus = replica_resources(world, use_gpus, cpus_per_replica, gpus_per_replica)
        return {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    bundle = rank_bundle(world, use_gpus, cpus_per_replica, gpus_per_replica)
    return {"placement_group_bundles": replica_bundles(world, bundle),
            "placement_group_strategy": "PACK",
            "ray_actor_options": {"num_cpus": HOST_CPUS, "num_gpus": 0}}


def replica_bundles(world: int, bundle: dict[str, float]) -> list[dict[str, float]]:
    """The placement group of one group replica: the driving actor's bundle, then one per rank."""
    return [{"CPU": HOST_CPUS}] + [dict(bundle) for _ in range(world)]


def _live_placement_groups() -> list[tuple[str, PlacementGroup]]:
    """(name, group) of every placement group in the cluster not removed, by id from the cluster's
    table (not by name: a name stays findable there whatever became of its creator)."""
    return [(entry.get("name", ""), PlacementGroup(ray.PlacementGroupID.from_hex(group_id)))
            for group_id, entry in placement_group_table().items() if entry.get("state") != "REMOVED"]


def remove_placement_groups(prefix: str) -> None:
    """Remove every placement group whose name starts with `prefix` (a run's, when it ends)."""
    for name, group in _live_placement_groups():
        if name.startswith(prefix):
            remove_placement_group(group)


def _actor_resources(bundle: dict[str, float]) -> dict[str, Any]:
    """A bundle as actor options: what the rank asks of its bundle (all of it)."""
    bundle = dict(bundle)
    options: dict[str, Any] = {"num_cpus": bundle.pop("CPU", 0), "num_gpus": bundle.pop("GPU", 0)}
    if "memory" in bundle:
        options["memory"] = bundle.pop("memory")
    if bundle:
        options["resources"] = bundle
    return options


@ray.remote(max_restarts=0)
class RenderRank:
    """One rank of a render replica: its process joins the group and holds its share of the model."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.generator = None

    def master_address(self) -> tuple[str, int]:
        """This node's address and a free port on it: where the group meets (asked of rank 0)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def start(self, model: str | ModelConfig, layout: ParallelConfig, master_addr: str, master_port: int,
              num_threads: int | None, load_options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Join the group (blocks until every rank has) and load the model's share for this rank
        (`load_options`: `load_generator`'s dtype / offload)."""
        from models.interface import join_render_group, load_generator

        join_render_group(self.rank, self.world, master_addr, master_port)
        self.generator = load_generator(model, num_threads=num_threads, parallel=layout, **(load_options or {}))
        g = self.generator
        return {"node_id": ray.get_runtime_context().get_node_id(), "info": g.info, "limits": g.limits,
                "precision": g.precision}

    def generate(self, requests: Sequence[RenderRequest], text_states: dict | None = None,
                 latents: bool = False) -> list[RenderOutput] | None:
        """Sample the requests with the other ranks; rank 0 returns the outputs (the same on every rank).
        `latents`: `generate_latents` (a disaggregated render's sampling stage)."""
        sample = self.generator.generate_latents if latents else self.generator.generate
        outputs = sample(requests, text_states=text_states)
        return outputs if self.rank == 0 else None

    def hands_over(self, request: RenderRequest) -> bool:
        return self.generator.hands_over(request)


class ModelParallelReplica:
    """A `VideoGenerator` whose model runs over a group of `RenderRank` actors (see the module doc).

    `model`: a model spec or config. `layout`: its sp/tp/cfg degrees (more than one rank).
    `rank_bundle`: what each rank reserves when the replica makes its own placement group (default:
    `rank_bundle` for the cluster, GPUs if it has any); inside one, each rank takes its bundle. `num_threads`: torch
    threads per rank (CPU ranks). `strategy`: of the placement group this replica makes;
    `placement_name`: its name, and a live group of that name is taken up again (this actor,
    restarted). `start_timeout_s`: how long the group may wait for its resources and its ranks.
    `load_options`: `load_generator`'s dtype / offload for every rank.
    """

    def __init__(self, model: str | ModelConfig, layout: ParallelConfig,
                 rank_bundle: dict[str, float] | None = None, num_threads: int | None = None,
                 strategy: str = "PACK", placement_name: str | None = None, start_timeout_s: float = 600.0,
                 load_options: dict[str, Any] | None = None):
        check_model_layout(model, layout)  # before any actor starts
        self.model, self.layout, self.world = model, layout, layout.world_size
        self.num_threads, self.start_timeout_s = num_threads, start_timeout_s
        self.load_options = dict(load_options or {})
        self.ranks: list = []
        self.rank_nodes: list[str] = []  # each rank's node id, once started
        self._owns_group = False
        self.placement_group, self.first_bundle, self.bundles, self._owns_group = self._placement(
            rank_bundle, strategy, placement_name)
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    # --- placement ---------------------------------------------------------------------------

    def _placement(self, bundle: dict[str, float] | None, strategy: str, name: str | None
                   ) -> tuple[PlacementGroup, int, list[dict[str, float]], bool]:
        """(placement group, index of rank 0's bundle, each rank's bundle, whether this replica made it)."""
        layout = layout_name(self.layout)
        current = get_current_placement_group()
        if current is not None:
            specs = current.bundle_specs
            if len(specs) != self.world + 1:
                raise ParallelConfigError(
                    f"parallel layout {layout}: this replica runs in a placement group of {len(specs)} bundles, "
                    f"the group needs {self.world + 1} (the replica's own, then one per rank: "
                    f"pipeline.stages.replica.replica_bundles)")
            return current, 1, [dict(b) for b in specs[1:]], False
        if bundle is None:
            bundle = rank_bundle(self.world, use_gpus=ray.cluster_resources().get("GPU", 0) > 0)
        found = [group for group_name, group in _live_placement_groups() if name and group_name == name]
        if found:  # this actor's, before Ray restarted it
            return found[0], 0, [dict(b) for b in found[0].bundle_specs], True
        group = placement_group([dict(bundle) for _ in range(self.world)], strategy=strategy, name=name or "")
        try:
            ray.get(group.ready(), timeout=self.start_timeout_s)
        except GetTimeoutError:
            remove_placement_group(group)
            raise RuntimeError(f"parallel layout {layout}: {self.world} bundles of {bundle} could not be placed in "
                               f"{self.start_timeout_s:g} s (cluster: {ray.cluster_resources()})") from None
        return group, 0, [dict(bundle) for _ in range(self.world)], True

    def _start(self) -> None:
        """Start one actor per rank in its bundle, meet at rank 0's address, load the model."""
        self.ranks = [
            RenderRank.options(
                **_actor_resources(self.bundles[r]),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=self.first_bundle + r),
            ).remote(r, self.world)
            for r in range(self.world)
        ]
        addr, port = ray.get(self.ranks[0].master_address.remote(), timeout=self.start_timeout_s)
        started = ray.get([rank.start.remote(self.model, self.layout, addr, port, self.num_threads, self.load_options)
                           for rank in self.ranks], timeout=self.start_timeout_s)
        self.rank_nodes = [s["node_id"] for s in started]
        self.info, self.limits = started[0]["info"], started[0]["limits"]
        self.precision = started[0]["precision"]

    # --- the generator interface ----------------------------------------------------------------

    def generate(self, requests: Sequence[RenderRequest], text_states: dict | None = None,
                 latents: bool = False) -> list[RenderOutput]:
        """Every rank samples the same requests (with the text states handed over, if any); rank 0's outputs
        are the result. `latents`: `generate_latents`'."""
        shared, states = ray.put(list(requests)), ray.put(text_states)  # once for all the ranks
        calls = [rank.generate.remote(shared, states, latents=latents) for rank in self.ranks]
        errors: dict[int, Exception] = {}  # rank -> what it raised
        pending = list(calls)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=FAILED_RANK_GRACE_S if errors else None)
            if not done:  # a rank failed and the others wait in a collective that cannot complete
                break
            try:
                ray.get(done[0])
            except Exception as e:
                errors[calls.index(done[0])] = e
        if not errors:
            return ray.get(calls[0])
        dead = sorted(r for r, e in errors.items() if isinstance(e, RayActorError))
        if pending or dead:  # the group is broken: start it again for the next batch
            self._restart()
        if dead:
            raise RuntimeError(f"rank {dead[0]} of the render group ({layout_name(self.layout)}) died while "
                               f"sampling; the group was started again")
        error = errors[min(errors)]
        if isinstance(error, RayTaskError):  # the rank's own exception (a bad request: one line)
            raise error.cause from None
        raise error

    def generate_latents(self, requests: Sequence[RenderRequest], text_states: dict | None = None
                         ) -> list[RenderOutput]:
        return self.generate(requests, text_states, latents=True)

    def hands_over(self, request: RenderRequest) -> bool:
        return ray.get(self.ranks[0].hands_over.remote(request))

    def _restart(self) -> None:
        for rank in self.ranks:
            ray.kill(rank)
        self._start()

    def shutdown(self) -> None:
        """Stop the ranks and release the placement group this replica made."""
        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
        if self._owns_group:
            remove_placement_group(self.placement_group)
            self._owns_group = False

    def __del__(self):
        try:
            if ray.is_initialized():
                self.shutdown()
        except Exception:  # interpreter or Ray shutting down: the owner's exit releases them anyway
            pass
