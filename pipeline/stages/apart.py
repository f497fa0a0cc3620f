"""A render's stages apart (`reel render --disaggregate`): text encoding and VAE decoding in actor pools of
their own, so the replicas that hold the DiT only sample.

    recaption → (inputs) → TextStatesUDF (captions → states) → RenderUDF(disaggregated=True) (states → latents)
              → DecodeUDF (latents → frames) → write

Each stage loads only its part of the model (`load_generator(parts=...)`, `models/handoff.py`): the text
stage the text encoder (Wan: umT5-XXL, about 11 GB in bf16), the decode stage the VAE; the sampling
replicas the DiT with the VAE (for given frames) and, for Wan's image checkpoints, the image encoder. What
crosses the object store per clip, besides what crosses it anyway: the captions' states and the latents
(docs/THROUGHPUT.md has the sizes). A row whose frames cannot be handed over as latents (given frames kept as
given, storyboards, extensions, the default model's long clips) is decoded by its sampling replica, and the
decode stage passes it on. The frames are the stages-together render's, exactly (tests/models/test_handoff.py).
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from pipeline.stages.base import add_timing, each_row
from pipeline.stages.modes import row_captions, single_request_frames
from pipeline.stages.render import put_frames


class PartUDF:
    """A stage that loads one part of the model (`parts`, `load_generator`'s)."""

    parts: tuple[str, ...] = ()

    def __init__(self, model: str, num_threads: int | None = None, dtype: str | None = None):
        from models.interface import load_generator

        self.generator = load_generator(model, num_threads=num_threads, dtype=dtype, parts=self.parts)


class TextStatesUDF(PartUDF):
    """captions → their text states (bytes in the row's `text_states`), with the model's text encoder alone."""

    parts = ("text",)

    def text_row(self, row: dict[str, Any]) -> None:
        from models.interface import to_bytes

        t0 = time.perf_counter()
        row["text_states"] = to_bytes(self.generator.encode_captions(row_captions(row)))
        add_timing(row, text=time.perf_counter() - t0)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return each_row(batch, "text", self.text_row)


class DecodeUDF(PartUDF):
    """latents → frames, with the model's VAE alone; rows already decoded by their sampling replica pass on."""

    parts = ("vae",)

    def decode_row(self, row: dict[str, Any]) -> None:
        if not row.get("latents"):
            return
        from models.interface import from_bytes

        t0 = time.perf_counter()
        frames = self.generator.decode_latents(from_bytes(row["latents"]))
        put_frames(row, single_request_frames(row, frames))
        row["latents"] = b""
        add_timing(row, decode=time.perf_counter() - t0)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return each_row(batch, "decode", self.decode_row)
