"""The inputs stage: a row's input pictures and clips, read and fitted on CPU actors (`InputsUDF`)."""

from __future__ import annotations

import time
from typing import Any

import pandas as pd

from models.interface import GridLimits
from pipeline.stages.base import add_timing, each_row
from pipeline.stages.modes import inputs_bytes, load_inputs


class InputsUDF:
    """A row's input pictures and clips (i2v, extend, interpolate, remix): read from their URIs and
    fitted to the row's size on CPU actors, so the render replicas only render."""

    def __init__(self, limits: GridLimits):
        self.limits = limits

    def inputs_row(self, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        row["inputs"] = inputs_bytes(load_inputs(row, self.limits))
        add_timing(row, inputs=time.perf_counter() - t0)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return each_row(batch, "inputs", self.inputs_row)
