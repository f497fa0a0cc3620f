"""The render stage: caption (+ inputs) → frames on a render replica (`RenderUDF`), and `row_frames`,
the frames it leaves in a row."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from models.interface import RenderRequest
from pipeline.stages.base import add_timing, each_row
from pipeline.stages.modes import (
    base_request,
    inputs_from_bytes,
    render_clip,
    row_adapters,
    single_request,
)


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

    `disaggregated`: the sampling stage of a render whose stages run apart (`pipeline/stages/apart.py`): the
    model loads without its text encoder and samples from the text states the text stage left in each row;
    a row whose clip is one request the generator hands over (`single_request`, `hands_over`) leaves its
    latents for the decode stage instead of frames. Other rows decode here.
    """

    def __init__(self, model: str, num_threads: int | None = None, parallel=None,
                 rank_bundle: dict[str, float] | None = None, placement_prefix: str | None = None,
                 dtype: str | None = None, offload: bool = False, compile: bool = False,
                 disaggregated: bool = False):
        self.disaggregated = disaggregated
        parts = ("dit", "vae") if disaggregated else None
        if parallel is not None and parallel.world_size > 1:
            import ray

            from pipeline.stages.replica import ModelParallelReplica

            actor = ray.get_runtime_context().get_actor_id()
            name = f"{placement_prefix}{actor}" if placement_prefix and actor else None
            self.generator = ModelParallelReplica(model, parallel, rank_bundle=rank_bundle, num_threads=num_threads,
                                                  placement_name=name,
                                                  load_options={"dtype": dtype, "offload": offload,
                                                                "compile": compile, "parts": parts})
        else:
            from models.interface import load_generator  # torch loads in the actor, not the driver

            self.generator = load_generator(model, num_threads=num_threads, dtype=dtype, offload=offload,
                                            compile=compile, parts=parts)

    def render_row(self, row: dict[str, Any]) -> None:
        inputs = inputs_from_bytes(row.get("inputs"))
        if not self.disaggregated:
            self._fill(row, *render_clip(self.generator, row, inputs))
            return
        from models.interface import from_bytes, to_bytes

        states = from_bytes(row["text_states"])
        row["text_states"] = b""  # the text stage's work is done: the row travels on without it
        request = single_request(row, inputs, self.generator.limits)
        if request is not None and self.generator.hands_over(request):
            [out] = self.generator.generate_latents([request], text_states=states)
            row["latents"] = to_bytes(out.latents)
            self._fill(row, None, out.timings, [], out.steps_computed)
        else:
            frames, timings, shots, steps_computed = render_clip(self.generator, row, inputs, text_states=states)
            self._fill(row, frames, timings, shots, steps_computed)

    def render_rows(self, rows: list[dict[str, Any]]) -> list[Exception | None]:
        """`render_row` for several rows, text→video rows of one shape and settings sampled as one
        batch (the generator's `generate_together`; serving's batcher calls this). Returns each
        row's exception, or None where it rendered; one row's failure leaves the others alone."""
        errors: list[Exception | None] = [None] * len(rows)
        together = getattr(self.generator, "generate_together", None)
        batched: dict[int, RenderRequest] = {}
        for i, row in enumerate(rows):
            if together is not None and row["mode"] == "t2v":
                try:
                    request = base_request(row)
                    self.generator.check(request)
                    batched[i] = request
                except Exception as e:
                    errors[i] = e
                continue
            try:
                self.render_row(row)
            except Exception as e:
                errors[i] = e
        if batched:
            try:
                outputs = together(list(batched.values()))
            except Exception as e:  # the whole batch failed (a device error): each of its rows did
                return [e if i in batched else err for i, err in enumerate(errors)]
            for i, out in zip(batched, outputs):
                self._fill(rows[i], out.frames, out.timings, [], out.steps_computed)
        return errors

    def _fill(self, row: dict[str, Any], frames: np.ndarray | None, timings: dict[str, float],
              shots: list[dict[str, Any]], steps_computed: int | None = None) -> None:
        """The rendered frames (None: the decode stage's to come), precision, shots, timings, LoRA records and the
        step cache's steps computed into the row (as the write stage reads them)."""
        if frames is not None:
            put_frames(row, frames)
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


def put_frames(row: dict[str, Any], frames: np.ndarray) -> None:
    """A clip's frames into its row, as `row_frames` reads them."""
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    row["frames_data"] = frames.tobytes()
    row["frames_shape"] = json.dumps(list(frames.shape))


def row_frames(row: dict[str, Any]) -> np.ndarray:
    """The frames `RenderUDF.render_row` left in a row, as uint8 (T, H, W, 3)."""
    return np.frombuffer(row["frames_data"], dtype=np.uint8).reshape(json.loads(row["frames_shape"]))
