"""Long Wan clips: past the model's window, sampled in windows of latent frames, each conditioned on the one before.

A Wan checkpoint is trained on one length (81 frames for Wan 2.1, 121 for TI2V-5B: its window). A request
for more frames (up to the folder's `max_frames`, models/wan/folder.py) is one latent sequence of
(frames - 1) / 4 + 1 latent frames, sampled window by window:

- the windows are the model's length in latent frames, each starting `context` latent frames before the
  last one ended (the last aligned to the clip's end, so it may share more), as the default model's
  windows are (`DiffusionVideoGenerator.windows`);
- window 0 is `WanPipeline`'s sampling of a window-long request (the same noise, the same frames);
  window k > 0 draws its noise from `window_seed(seed, k)`;
- the latent frames a window shares with those already sampled are held to them: before every step they
  are set to the sampled latents noised to that step's level with the window's own noise (the scheduler's
  `add_noise`, as diffusers' inpainting pipelines hold the known region), and after the last step to the
  sampled latents themselves. The transformer sees the held frames at the level of the rest, so the new
  frames are drawn consistent with them (RePaint-style replacement; Open-Sora's and SkyReels' extension
  condition on re-encoded pixel frames instead, which costs a decode and an encode per window and needs a
  checkpoint that takes given frames; this works on text-to-video checkpoints as they are);
- the windows' latents are stitched into one sequence and decoded once (the causal VAE over the whole clip,
  in chunks: models/wan/vae_decode.py), so there is no seam in pixels between windows either.

Works on every variant (Wan 2.1, TI2V-5B, Wan 2.2 A14B's two experts) and under a parallel layout: every
rank samples the same windows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from models.generator import window_seed, window_starts
from models.render_types import RenderRequest


def latent_windows(total: int, window: int, context: int) -> list[tuple[int, int]]:
    """The [start, end) latent-frame ranges of a clip of `total` latent frames, in sampling order: windows of
    `window` frames, each starting `context` before the last one ended, the last ending at the clip's end."""
    if total <= window:
        return [(0, total)]
    if not 0 < context < window:
        raise ValueError(f"context={context} latent frames must be in 1..{window - 1}")
    return [(s, s + window) for s in window_starts(total, window, window - context)]


class ContextHold:
    """Holds a window's first latent frames to `context` (the latents already sampled there) while it samples.

    `noise`: the window's initial latents (pure noise), whose first frames noise the context at every step.
    `scheduler`: the window's scheduler, set to its timesteps with a begin index; its `add_noise` then noises
    to the level of the step it is at (its step index; the begin index before the first step).
    """

    def __init__(self, context: torch.Tensor, noise: torch.Tensor, scheduler):
        self.context, self.scheduler = context, scheduler
        self.frames = context.shape[2]
        self.noise = noise[:, :, :self.frames].clone()

    def before_step(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`latents` with the held frames set to the context noised to step `t`'s level."""
        noised = self.scheduler.add_noise(self.context, self.noise, t.reshape(1))
        latents[:, :, :self.frames] = noised.to(latents.dtype)
        return latents

    def after_sampling(self, latents: torch.Tensor) -> torch.Tensor:
        """The window's final latents with the held frames set to the context itself."""
        latents[:, :, :self.frames] = self.context.to(latents.dtype)
        return latents


def sample_long(generator, r: RenderRequest, cond: torch.Tensor, uncond: torch.Tensor | None,
                on_window: Callable[[int, torch.Tensor], None] | None = None, caches: dict | None = None
                ) -> torch.Tensor:
    """The latents (1, C, (frames - 1) / 4 + 1, H', W') of a request longer than a `WanVideoGenerator`'s
    window, sampled window by window (its `sample` with `context`), each held to the latents before it.
    `on_window(first latent frame, final latents)` is called with each window as it is sampled; `caches`:
    the request's step caches (`WanVideoGenerator.step_caches`), used by every window."""
    ft = generator.folder.temporal_factor
    window_frames = generator.limits.window_frames
    total, window = (r.frames - 1) // ft + 1, (window_frames - 1) // ft + 1
    clip = None  # the latents sampled so far, in the clip's frame order
    done = 0
    for k, (start, end) in enumerate(latent_windows(total, window, generator.limits.context_frames // ft)):
        request = dataclasses.replace(r, frames=window_frames, seed=window_seed(r.seed, k))
        context = None if clip is None else clip[:, :, start:done]
        latents = generator.sample(request, cond, uncond, caches=caches, context=context)
        if clip is None:
            clip = latents.new_empty((*latents.shape[:2], total, *latents.shape[3:]))
        clip[:, :, start:end] = latents
        done = end
        if on_window is not None:
            on_window(start, latents)
    return clip
