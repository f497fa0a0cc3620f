"""The step cache (`models/step_cache.py`) on diffusers' `WanTransformer3DModel`, with diffusers' own hooks.

diffusers' First Block Cache (`diffusers.hooks.first_block_cache`) is the mechanism: a head hook on
blocks.0 that keeps the first block's residual and, on a cached step, adds the tail's residual to its
output; block hooks that pass the hidden states through on a cached step and keep the tail's residual on
a computed one; per-pass state ("cond" / "uncond") in a `StateManager`. One thing is replaced: its
decision (`_should_compute_remaining_blocks`, a local `.abs().mean()` ratio) becomes `StepCache.reuse`,
which all-reduces the conditional pass's sums over the replica's group and leaves sp padding out, so
every rank of a parallel layout skips the same steps as one rank would. The hooks are registered for one
request's sampling and removed after it, so a render without the cache runs diffusers' model untouched.

    with WanStepCache(transformer, StepCache(0.1, group), shard) as cache:
        for t in timesteps:
            cache.step_cache.start_step()
            guided_prediction(transformer, ..., step_cache=cache)   # enters cache.pass_("cond") / ("uncond")
"""

from __future__ import annotations

import torch
from diffusers.hooks.first_block_cache import FBCBlockHook, FBCHeadBlockHook, FBCSharedBlockState
from diffusers.hooks.hooks import CacheContext, HookRegistry, StateManager

from models.parallel import TokenShard
from models.step_cache import StepCache

__all__ = ["WanStepCache"]

HOOK_NAME = "reelforge_step_cache"


class AgreedHeadBlockHook(FBCHeadBlockHook):
    """diffusers' first-block hook whose decision is `StepCache.reuse` (agreed over the group)."""

    def __init__(self, state_manager: StateManager, cache: StepCache, shard: TokenShard | None):
        super().__init__(state_manager, cache.threshold)
        self.cache, self.shard = cache, shard

    @torch.compiler.disable
    def _should_compute_remaining_blocks(self, hidden_states_residual: torch.Tensor) -> bool:
        if self.shard is not None:  # this rank's real tokens of the sp shard
            self.cache.real_tokens = self.shard.stop - self.shard.start
        return not self.cache.reuse(hidden_states_residual)


class WanStepCache:
    """The step cache's hooks on one transformer for one request (a context manager); `pass_` names each
    forward ("cond" decides, "uncond" follows the step's decision or, on its own cfg rank, adds zeros)."""

    def __init__(self, transformer: torch.nn.Module, step_cache: StepCache, shard: TokenShard | None = None):
        self.transformer, self.step_cache, self.shard = transformer, step_cache, shard
        self.state = StateManager(FBCSharedBlockState, (), {})

    def __enter__(self) -> WanStepCache:
        blocks = list(self.transformer.blocks)
        hooks = [AgreedHeadBlockHook(self.state, self.step_cache, self.shard)]
        hooks += [FBCBlockHook(self.state, is_tail=i == len(blocks) - 1) for i in range(1, len(blocks))]
        for block, hook in zip(blocks, hooks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, HOOK_NAME)
        return self

    def __exit__(self, *exc) -> None:
        for block in self.transformer.blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(HOOK_NAME, recurse=False)
        self.state.reset()

    def pass_(self, name: str) -> None:
        """The next forward is the `name` pass ("cond" or "uncond") of the current step."""
        self.state.set_context(CacheContext(name))
        self.step_cache.cond_rows = slice(None) if name == "cond" else None
