"""The step cache: skip a DiT's later blocks on sampling steps where its input barely changed.

First-block cache (ParaAttention's FBCache, diffusers' `FirstBlockCacheConfig`, cache-dit's DBCache
with one front block and no back blocks): at every step the first block runs; the change of its
residual (output - input) since the last step that ran every block,

    change = sum |r_now - r_then| / sum |r_then|      (over the conditional pass's real tokens),

decides the step. Below `threshold` the remaining blocks are skipped and their residual from the last
computed step (hidden after the last block - hidden after the first) is added to the first block's
output; otherwise every block runs and both residuals are kept. The first step always computes.

Why this and not TeaCache/MagCache: those decide from the timestep-modulated input through a polynomial
fitted per model (TeaCache) or from magnitude ratios calibrated per model (MagCache); the first block's
residual needs no calibration, so one rule serves the default model and every Wan folder.

Agreed across ranks: diffusers' own hook decides from its local tensor (`.abs().mean()`), so under
sequence parallelism each rank would decide on its shard and the ranks' collectives would part ways.
Here the two sums are all-reduced over the replica's whole group (sp x tp x cfg) in float64 before
anyone decides: every rank takes the same decision, and it is the one-rank decision. Only the
conditional pass's rows count (on a cfg=2 layout rank 1 contributes zeros; tp ranks other than 0 too,
since they hold copies), padded tokens of the last sp shard are left out, and a step's later passes
(Wan's unconditional forward on one rank) follow the decision the step's first forward took.

    cache = StepCache(0.1, group=mesh.group, contributes=mesh.tp_rank == 0)
    for step ...:
        cache.start_step()
        cache.cond_rows = slice(0, b)          # which batch rows of the next forward are conditional
        x = run_blocks(blocks, x, args, cache)  # the default model; Wan: hooks (models/wan/step_cache.py)
    cache.steps_computed
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["StepCache", "run_blocks"]


class StepCache:
    """The state of one sampling run's first-block cache (see the module doc); not shared between runs.

    `group`: the process group whose ranks must agree (None: this process alone). `contributes`: whether
    this rank's conditional rows count in the sums (False on tp ranks other than 0: they hold copies).
    """

    def __init__(self, threshold: float, group=None, contributes: bool = True):
        if not threshold >= 0:
            raise ValueError(f"step cache threshold must be >= 0, got {threshold}")
        self.threshold, self.group, self.contributes = float(threshold), group, contributes
        self.steps = 0  # steps started
        self.steps_computed = 0  # steps that ran every block
        self.cond_rows: slice | None = slice(None)  # conditional batch rows of the next forward (None: none)
        self.real_tokens: int | None = None  # tokens of this rank's shard that are not padding (None: all)
        self.tail: torch.Tensor | None = None  # the remaining blocks' residual (`run_blocks`)
        self._previous: torch.Tensor | None = None  # the conditional first-block residual of the last computed step
        self._decision: bool | None = None  # this step's: True = reuse the tail

    def new_window(self) -> None:
        """The next window of a long clip, sampled on the same cache: its first step computes, as any run's first
        does (the last window's residuals are of another latent and noise level); the steps computed add up."""
        self._previous = self.tail = None

    def start_step(self) -> None:
        """A new sampling step: its first forward decides, the step's later forwards follow."""
        self.steps += 1
        self._decision = None

    def reuse(self, residual: torch.Tensor) -> bool:
        """Whether this forward skips the remaining blocks, given the first block's residual (B, N, D)."""
        if self._decision is not None:
            return self._decision
        part = residual[self.cond_rows] if (self.cond_rows is not None and self.contributes) else residual[:0]
        if self.real_tokens is not None:
            part = part[:, :self.real_tokens]
        sums = torch.zeros(2, dtype=torch.float64, device=residual.device)
        if self._previous is not None and part.numel():
            sums[0] = (part.double() - self._previous).abs().sum()
            sums[1] = self._previous.abs().sum()
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(sums, group=self.group)
        change = float(sums[0] / sums[1]) if sums[1] > 0 else float("inf")
        self._decision = self.steps_computed > 0 and change < self.threshold
        if not self._decision:
            self.steps_computed += 1
            if part.numel():
                self._previous = part.detach().double()
        return self._decision


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, args: tuple, cache: StepCache | None = None
               ) -> torch.Tensor:
    """x through every block (`block(x, *args)`), or, where `cache` says the step may, through the first
    block plus the remaining blocks' residual of the last computed step."""
    if cache is None:
        for block in blocks:
            x = block(x, *args)
        return x
    first = blocks[0](x, *args)
    if cache.reuse(first - x):
        return first + cache.tail
    h = first
    for block in blocks[1:]:
        h = block(h, *args)
    cache.tail = h - first
    return h
