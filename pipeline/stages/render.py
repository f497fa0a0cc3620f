"""The render stage: caption (+ inputs) → frames on a render replica (`RenderUDF`), and `row_frames`,
the frames it leaves in a row."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from pipeline.stages.base import add_timing, each_row
from pipeline.stages.modes import base_request, inputs_from_bytes, render_clip, row_adapters


class RenderUDF:
    """caption (+ inputs) → frames, on a render replica (GPU actors, or CPU actors where there are none).

    `parallel`: the replica's layout (models.config.ParallelConfig). More than one rank makes the
    replica a group of Ray actors, one per rank, that this actor drives (`pipeline.stages.replica`); one
    rank, or None, runs the model in this actor. `rank_bundle`: what each rank reserves. The
    group's placement group is named `placement_prefix` + this actor's id when a prefix is given,
    so that the actor, restarted by Ray, finds it again (and the driver removes a run's groups by
    the prefix when the run ends); inside a placement group already (Serve), that one is used.
    `dtype` / `offload` / `compile`: the precision, CPU offload and torch.compile of the DiT's blocks the model
    loads with (`load_generator`); the
    precision it runs in goes into each row (`dtype`, recorded in the metadata).
    """

    def __init__(self, model: str, num_threads: int | None = None, parallel=None,
                 rank_bundle: dict[str, float] | None = None, placement_prefix: str | None = None,
                 dtype: str | None = None, offload: bool = False, compile: bool = False):
        if parallel is not None and parallel.world_size > 1:
            import ray

            from pipeline.stages.replica import ModelParallelReplica

            actor = ray.get_runtime_context().get_actor_id()
            name = f"{placement_prefix}{actor}" if placement_prefix and actor else None
            self.generator = ModelParallelReplica(model, parallel, rank_bundle=rank_bundle, num_threads=num_threads,
                                                  placement_name=name,
                                                  load_options={"dtype": dtype, "offload": offload,
                                                                "compile": compile})
        else:
            from models.interface import load_generator  # torch loads in the actor, not the driver

            self.generator = load_generator(model, num_threads=num_threads, dtype=dtype, offload=offload,
                                            compile=compile)

    def render_row(self, row: dict[str, Any]) -> None:
        frames, timings, shots, steps_computed = render_clip(self.generator, row, inputs_from_bytes(row.get("inputs")))
        self._fill(row, frames, timings, shots, steps_computed)

    def render_rows(self, rows: list[dict[str, Any]]) -> list[Exception | None]:
        """`render_row` for several rows, text→video rows of one shape and settings sampled as one
        batch (the generator's `generate_together`; serving's batcher calls this). Returns each
        row's exception, or None where it rendered; one row's failure leaves the others alone."""
        errors: list[Exception | None] = [None] * len(rows)
        together = getattr(self.generator, "generate_together", None)
        batched: list[int] = []
        for i, row in enumerate(rows):
            if together is not None and row["mode"] == "t2v":
                try:
                    self.generator.check(base_request(row))
                    batched.append(i)
                except Exception as e:
                    errors[i] = e
                continue
            try:
                self.render_row(row)
            except Exception as e:
                errors[i] = e
        if batched:
            try:
                outputs = together([base_request(rows[i]) for i in batched])
            except Exception as e:  # the whole batch failed (a device error): each of its rows did
                return [e if i in batched else err for i, err in enumerate(errors)]
            for i, out in zip(batched, outputs):
                self._fill(rows[i], out.frames, out.timings, [], out.steps_computed)
        return errors

    def _fill(self, row: dict[str, Any], frames: np.ndarray, timings: dict[str, float],
              shots: list[dict[str, Any]], steps_computed: int | None = None) -> None:
        """The rendered frames, precision, shots, timings, LoRA records and the step cache's steps computed
        into the row (as the write stage reads them)."""
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        row["frames_data"] = frames.tobytes()
        row["frames_shape"] = json.dumps(list(frames.shape))
        row["inputs"] = b""
        row["dtype"] = self.generator.precision
        if shots:
            row["shot_records"] = json.dumps(shots)
        adapters = row_adapters(row)
        if adapters:  # each file's digest for the metadata (hashed once per machine)
            from models.interface import lora_records

            row["lora_records"] = json.dumps(lora_records(adapters))
        if steps_computed is not None:
            row["steps_computed"] = steps_computed
        add_timing(row, **timings)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return each_row(batch, "render", self.render_row)


def row_frames(row: dict[str, Any]) -> np.ndarray:
    """The frames `RenderUDF.render_row` left in a row, as uint8 (T, H, W, 3)."""
    return np.frombuffer(row["frames_data"], dtype=np.uint8).reshape(json.loads(row["frames_shape"]))
