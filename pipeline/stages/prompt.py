"""The prompt stage: safety gate → recaption → safety gate, on CPU actors (`RecaptionUDF`)."""

from __future__ import annotations

import json
import time
from typing import Any

import pandas as pd

from pipeline.prompt.recaption import load_recaptioner
from pipeline.stages.base import add_timing, each_row


class RecaptionUDF:
    """prompt → caption, on CPU actors (a storyboard: one caption per shot, each shot's caption
    filling what its prompt leaves open from the shot before).

    The safety gate runs here too, before anything is sampled: on the prompts (a blocked prompt
    is not even recaptioned) and on the captions (what the model would be asked for). A blocked
    row fails at stage "safety" with `blocked by policy: <category>`.
    """

    def __init__(self, recaptioner: str, policy: str | None = None):
        from pipeline.prompt.safety.policy import load_policy

        self.recaptioner = load_recaptioner(recaptioner)
        self.policy = load_policy(policy)

    def recaption_row(self, row: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        seed = int(row["seed"])
        shots = [prompt for prompt, _ in json.loads(row["shots"])] if row.get("shots") else []
        if self._blocked(row, row["prompt"], row.get("negative_prompt"), *shots):
            return
        if shots:
            captions: list[str] = []
            for prompt in shots:
                captions.append(self.recaptioner.recaption(prompt, seed, context=captions[-1] if captions else ""))
            row["shot_captions"] = json.dumps(captions)
            row["caption"] = " ".join(captions)
        else:
            row["caption"] = self.recaptioner.recaption(row["prompt"], seed)
        row["recaptioner"] = self.recaptioner.name
        add_timing(row, recaption=time.perf_counter() - t0)
        self._blocked(row, row["caption"])

    def _blocked(self, row: dict[str, Any], *texts: str | None) -> bool:
        from pipeline.prompt.safety.policy import blocked_reason

        verdict = self.policy.check(*(t or None for t in texts))
        if verdict is not None:
            row["error"], row["stage"] = blocked_reason(verdict), "safety"
        return verdict is not None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return each_row(batch, "recaption", self.recaption_row)
