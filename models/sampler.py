"""Rectified flow (Liu et al. 2022; SD3, Esser et al. 2024): the training loss and the sampler.

A clean latent video x0 and Gaussian noise are joined by a straight line

    x_t = (1 - t) · x0 + t · noise,     t ∈ [0, 1],

whose velocity dx_t/dt = noise - x0 is what the DiT learns to predict. Sampling integrates that
ODE from pure noise (t = 1) to data (t = 0) with Euler steps, the timesteps bent by SD3's shift,
and classifier-free guidance (Ho & Salimans 2022) mixing the text-conditioned and the
unconditional velocity, both from one forward pass over a batch of two.

Frame conditioning (Open-Sora): latent frames whose mask is 1 are given (clean latents). They are
held at x0 in x_t, fed to the model as extra channels, and left out of the loss; the same rule
serves text→video (mask all 0), image→video (first frame), extension (first k frames forward, last
k backward) and interpolation (first and last).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from models.step_cache import StepCache
from models.training.config import COND_PROBS


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's shift: t' = s·t / (1 + (s - 1)·t). s > 1 moves time towards the noisy end."""
    return shift * t / (1 + (shift - 1) * t)


def sampling_timesteps(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps + 1 times from 1 down to 0 (float32), evenly spaced before the shift."""
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def _frames(mask: torch.Tensor) -> torch.Tensor:
    """A (B, T') frame mask as (B, 1, T', 1, 1), to broadcast over latents (B, C, T', H, W)."""
    return mask[:, None, :, None, None]


def apply_frame_conditioning(x: torch.Tensor, cond_latents: torch.Tensor | None,
                             cond_mask: torch.Tensor | None) -> torch.Tensor:
    """x with the given latent frames (mask 1) replaced by the conditioning latents."""
    if cond_latents is None or cond_mask is None:
        return x
    m = _frames(cond_mask.to(x.dtype))
    return x * (1 - m) + cond_latents.to(x.dtype) * m


class FlowMatchSampler:
    """Euler sampler for rectified flow with a timestep shift and classifier-free guidance.

    Args:
        steps: default number of Euler steps.
        guidance: default guidance scale w; v = v_uncond + w·(v_cond - v_uncond). w = 1 is the
            conditional model alone (one forward per step instead of a batch of two).
        shift: SD3 timestep shift.
    """

    def __init__(self, steps: int = 20, guidance: float = 4.5, shift: float = 1.0):
        self.steps, self.guidance, self.shift = steps, guidance, shift

    @torch.no_grad()
    def sample(self, model: nn.Module, noise: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None,
               uncond_text: torch.Tensor | None = None, uncond_mask: torch.Tensor | None = None, *,
               cond_latents: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
               steps: int | None = None, guidance: float | None = None,
               init_latents: torch.Tensor | None = None, strength: float = 1.0,
               callback: Callable[[int, torch.Tensor], None] | None = None,
               step_cache: StepCache | None = None) -> torch.Tensor:
        """Latents x0 (B, C, T', H', W') from noise of that shape, given text states (B, L, D).

        `uncond_text`/`uncond_mask` (the empty or negative caption) are needed when guidance != 1.
        `cond_latents` (B, C, T', H', W') with `cond_mask` (B, T') hold given frames fixed; the
        model sees their latents and zeros for the other frames, as `flow_matching_loss` trains it.
        `init_latents` with `strength` s < 1 (SDEdit, Meng et al. 2022): start from the straight
        line's point x_s = (1 - s)·init + s·noise and integrate from t = s to 0 in `steps` steps (the
        schedule scaled into [0, s]); s = 0 returns `init_latents`.
        `step_cache` (`models/step_cache.py`): steps whose first-block residual barely changed skip the
        model's later blocks (its `steps_computed` counts the others).
        """
        steps = self.steps if steps is None else steps
        guidance = self.guidance if guidance is None else guidance
        use_cfg = guidance != 1.0
        if use_cfg and uncond_text is None:
            raise ValueError("classifier-free guidance needs the unconditional text states")

        if cond_latents is not None and cond_mask is not None:  # as trained: zeros where nothing is given
            cond_latents = cond_latents * _frames(cond_mask.to(cond_latents.dtype))
        velocity = self.velocity_fn(model, guidance, text, text_mask, uncond_text, uncond_mask,
                                    cond_latents, cond_mask, step_cache)
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        timesteps = sampling_timesteps(steps, self.shift).to(noise.device)
        x = noise
        if strength < 1.0:
            if init_latents is None:
                raise ValueError("strength < 1 needs init_latents")
            if strength == 0.0:
                return init_latents.clone()
            timesteps = timesteps * strength
            x = (1 - strength) * init_latents.to(noise.dtype) + strength * noise
        x = apply_frame_conditioning(x, cond_latents, cond_mask)
        for i in range(steps):
            t, t_next = timesteps[i], timesteps[i + 1]
            if step_cache is not None:
                step_cache.start_step()
            v = velocity(x, t)
            x = x + (t_next - t) * v  # Euler step towards t = 0
            x = apply_frame_conditioning(x, cond_latents, cond_mask)
            if callback is not None:
                callback(i, x)
        return x

    def velocity_fn(self, model: nn.Module, guidance: float, text: torch.Tensor, text_mask: torch.Tensor | None,
                    uncond_text: torch.Tensor | None, uncond_mask: torch.Tensor | None,
                    cond_latents: torch.Tensor | None, cond_mask: torch.Tensor | None,
                    step_cache: StepCache | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The guided velocity v(x, t) (float32) of one step: here one forward over [cond; uncond].

        The hook a parallel sampler overrides (CFG parallelism puts the two halves on two ranks).
        With `step_cache` the model is called with it, the conditional rows marked as the deciding ones.
        """
        extra = {} if step_cache is None else {"step_cache": step_cache}
        use_cfg = guidance != 1.0
        if use_cfg:  # one forward over [cond; uncond]
            text = torch.cat([text, uncond_text])
            text_mask = None if text_mask is None else torch.cat([text_mask, uncond_mask])
            cond_in = None if cond_latents is None else torch.cat([cond_latents, cond_latents])
            mask_in = None if cond_mask is None else torch.cat([cond_mask, cond_mask])
        else:
            cond_in, mask_in = cond_latents, cond_mask

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = x.shape[0]
            x_in = torch.cat([x, x]) if use_cfg else x
            if step_cache is not None:
                step_cache.cond_rows = slice(0, b)
            v = model(x_in, t.expand(x_in.shape[0]), text, text_mask, cond_in, mask_in, **extra).float()
            if use_cfg:
                v_cond, v_uncond = v[:b], v[b:]
                v = v_uncond + guidance * (v_cond - v_uncond)
            return v

        return velocity


# --- training -------------------------------------------------------------------------------------

def random_frame_masks(batch: int, frames: int, probs: dict[str, float] | None = None,
                       generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, frames) float masks of given latent frames, one task drawn per sample.

    Tasks: "i2v" (the first frame), "extend" (the first k, 1 <= k < frames), "extend_backward"
    (the last k), "interpolate" (first and last); otherwise none (text→video).
    """
    probs = COND_PROBS if probs is None else probs
    masks = torch.zeros(batch, frames)
    u = torch.rand(batch, generator=generator)
    ks = torch.randint(1, max(frames, 2), (batch,), generator=generator)
    for i in range(batch):
        edge = 0.0
        for task, p in probs.items():
            if edge <= u[i] < edge + p:
                if task == "i2v":
                    masks[i, 0] = 1
                elif task == "extend":
                    masks[i, : int(ks[i])] = 1
                elif task == "extend_backward":
                    masks[i, frames - int(ks[i]):] = 1
                elif task == "interpolate":
                    masks[i, 0] = masks[i, -1] = 1
                else:
                    raise ValueError(f"unknown conditioning task {task!r}")
            edge += p
    if frames == 1:
        masks.zero_()  # nothing left to generate otherwise
    return masks.to(device)


#: Lowest noise level of the "high noise" draws (`sample_training_timesteps`' high_noise_share):
#: the band the sampler's first steps cross (1.0 → 0.89 in 3 of 20 steps at shift 2).
HIGH_NOISE_FROM = 0.9


def sample_training_timesteps(batch: int, method: str = "logit_normal", shift: float = 1.0,
                              generator: torch.Generator | None = None,
                              high_noise_share: float = 0.0) -> torch.Tensor:
    """t per sample: "logit_normal" (SD3: sigmoid of N(0, 1)) or "uniform", then shifted.

    With `high_noise_share` p > 0, each sample instead draws t uniformly from [HIGH_NOISE_FROM, 1)
    with probability p. There a clip's layout and path are settled, from a prediction that can
    only be the caption's mean clip; logit-normal t rarely lands there (t > 0.9 in 5% of samples
    unshifted), so conditions with a small effect on that mean (a motion's direction) go unlearnt.
    p = 0 draws nothing extra: the same generator state gives the same t as before.
    """
    if method == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator))
    elif method == "uniform":
        t = torch.rand(batch, generator=generator)
    else:
        raise ValueError(f"unknown timestep sampling {method!r}")
    t = shift_timesteps(t, shift)
    if high_noise_share > 0:
        high = torch.rand(batch, generator=generator) < high_noise_share
        band = HIGH_NOISE_FROM + (1 - HIGH_NOISE_FROM) * torch.rand(batch, generator=generator)
        t = torch.where(high, band.to(t.dtype), t)
    return t


def flow_matching_loss(model: nn.Module, x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                       *, uncond_text: torch.Tensor | None = None, uncond_mask: torch.Tensor | None = None,
                       text_dropout: float = 0.1, cond_probs: dict[str, float] | None = None,
                       timestep_sampling: str = "logit_normal", shift: float = 1.0,
                       high_noise_share: float = 0.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean squared error of the predicted velocity on the frames to generate (a scalar).

    x0: clean latents (B, C, T', H', W') from the VAE. text/text_mask: caption states. With
    `uncond_text` (B or 1 rows), each caption is replaced by it with probability `text_dropout`
    so that the model also learns the unconditional velocity that guidance needs. Randomness
    (noise, t, masks, dropout) is drawn on the CPU from `generator`, so a seeded step is repeatable
    on any device.
    """
    b, _, frames = x0.shape[:3]
    device = x0.device
    noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
    t = sample_training_timesteps(b, timestep_sampling, shift, generator, high_noise_share).to(device)
    cond_mask = random_frame_masks(b, frames, cond_probs, generator, device)

    t_ = t.to(x0.dtype)[:, None, None, None, None]
    x_t = apply_frame_conditioning((1 - t_) * x0 + t_ * noise, x0, cond_mask)
    cond_latents = x0 * _frames(cond_mask.to(x0.dtype))

    if uncond_text is not None and text_dropout > 0:
        drop = (torch.rand(b, generator=generator) < text_dropout).to(device)
        text = torch.where(drop[:, None, None], uncond_text.expand_as(text), text)
        if text_mask is not None:
            text_mask = torch.where(drop[:, None], uncond_mask.expand_as(text_mask), text_mask)

    v_pred = model(x_t, t, text, text_mask, cond_latents, cond_mask)
    target = noise - x0
    weight = 1 - _frames(cond_mask.to(v_pred.dtype))  # given frames are not learned
    err = (v_pred.float() - target.float()).pow(2) * weight
    denom = weight.expand_as(err).sum().clamp_min(1.0)
    return err.sum() / denom
