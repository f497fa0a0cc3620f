"""What every stage shares: `Stage` (a UDF class and the `map_batches` arguments it runs under)
and the per-row plumbing of the UDFs (`each_row`, `add_timing`).

A stage follows the `ray.data.llm` pattern: a UDF class loads its heavy state once in `__init__`
and transforms one batch in `__call__`; the work on one row lives in a plain method
(`recaption_row`, `inputs_row`, `render_row`, `write_row`) that the online endpoint reuses without
Ray Data. A row that fails a stage keeps flowing with `error` and `stage` set, so the driver
records it and later stages leave it alone: a bad row never costs the good ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.errors import one_line


def each_row(batch: pd.DataFrame, stage: str, fn: Callable[[dict[str, Any]], None]) -> pd.DataFrame:
    """Apply `fn` to every row still in good standing; an exception fails that row alone."""
    rows = batch.to_dict("records")
    for row in rows:
        if row.get("error"):
            continue
        try:
            fn(row)
        except Exception as e:  # one row's failure must not cost the batch
            row["error"], row["stage"] = one_line(e), stage
    return pd.DataFrame.from_records(rows, columns=list(batch.columns) if not rows else None)


def add_timing(row: dict[str, Any], **seconds: float) -> None:
    """Add seconds to the row's timings; a part two stages share adds up (a disaggregated render's "text": the
    text stage's encoding and the sampling replica's picture encoding)."""
    timings = json.loads(row.get("timings") or "{}")
    for part, value in seconds.items():
        timings[part] = timings.get(part, 0.0) + value
    row["timings"] = json.dumps(timings)


@dataclass
class Stage:
    """A UDF class and the `map_batches` arguments it runs under."""

    udf: type
    constructor_kwargs: dict[str, Any]
    map_batches_kwargs: dict[str, Any] = field(default_factory=dict)

    def apply(self, ds):
        return ds.map_batches(
            self.udf, fn_constructor_kwargs=self.constructor_kwargs, batch_format="pandas",
            **self.map_batches_kwargs,
        )


def optional_number(value: Any) -> float | None:
    """A row's optional number as a float; None for a missing one (None, or the NaN pandas gives)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return float(value)


class FusedUDF:
    """Several stages in one actor: each batch goes through their UDFs in order, every stage with its
    own per-row error handling, as it would through separate actors.

    `build_stages` fuses the light stages (recaption, inputs, write) into the render replicas of a
    CPU-only run: there they only compete with the replicas for the same cores, and each separate
    actor costs a process start (the shapes recaptioner's torch and transformers), a Ray Data hop and
    a copy of every clip's frames through the object store (docs/THROUGHPUT.md).
    """

    def __init__(self, stages: list[tuple[type, dict[str, Any]]]):
        self.udfs = [udf(**kwargs) for udf, kwargs in stages]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        for udf in self.udfs:
            batch = udf(batch)
        return batch
