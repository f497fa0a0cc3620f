import pytest
import torch
import torch.nn as nn

from models.config import DiTConfig
from models.dit import VideoDiT
from models.sampler import (
    HIGH_NOISE_FROM,
    FlowMatchSampler,
    flow_matching_loss,
    random_frame_masks,
    sample_training_timesteps,
    sampling_timesteps,
    shift_timesteps,
)


class Oracle(nn.Module):
    """The exact rectified-flow velocity when all data is one point: v = (x_t - x0) / t.

    The text states say which point (cond: text = +1, uncond: text = 0); the target is text * a.
    """

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.a, self.batches = a, []

    def forward(self, x, t, text, text_mask, cond_latents=None, cond_mask=None):
        self.batches.append(x.shape[0])
        target = text[:, :1, :1, None, None] * self.a
        return (x - target) / t[:, None, None, None, None]


def test_timesteps_run_from_noise_to_data():
    ts = sampling_timesteps(10, shift=3.0)
    assert ts.shape == (11,) and ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    assert (ts[1:-1] > sampling_timesteps(10, shift=1.0)[1:-1]).all()  # shift spends longer at high noise
    assert torch.allclose(shift_timesteps(torch.tensor([0.0, 1.0]), 5.0), torch.tensor([0.0, 1.0]))


def test_training_noise_levels_follow_the_shift():
    g = torch.Generator().manual_seed(0)
    plain, shifted = (sample_training_timesteps(20000, "logit_normal", s, g) for s in (1.0, 2.0))
    assert abs(plain.median().item() - 0.5) < 0.01                   # logit-normal: centred
    assert abs(shifted.median().item() - 2 / 3) < 0.01               # s·t / (1 + (s - 1)·t) at t = 0.5
    assert (shifted > 0.9).float().mean() > 3 * (plain > 0.9).float().mean()  # more of the noisiest


def test_a_high_noise_share_moves_that_share_into_the_top_band():
    draw = lambda share, seed=0: sample_training_timesteps(  # noqa: E731
        20000, "logit_normal", 1.0, torch.Generator().manual_seed(seed), high_noise_share=share)
    plain, mixed = draw(0.0), draw(0.4)
    assert torch.equal(plain, sample_training_timesteps(20000, "logit_normal", 1.0, torch.Generator().manual_seed(0)))
    top = (plain >= HIGH_NOISE_FROM).float().mean().item()          # about 5% unshifted
    assert abs((mixed >= HIGH_NOISE_FROM).float().mean().item() - (0.4 + 0.6 * top)) < 0.015
    assert mixed.max() < 1 and abs((mixed < 0.5).float().mean().item() - 0.6 * 0.5) < 0.015  # the rest as before
    assert torch.equal(mixed, draw(0.4))                            # seeded


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_euler_with_guidance_lands_on_the_guided_point(guidance):
    a = torch.randn(1, 2, 2, 4, 4)
    model = Oracle(a)
    cond, uncond = torch.ones(1, 3, 5), torch.zeros(1, 3, 5)
    noise = torch.randn(1, 2, 2, 4, 4)
    x0 = FlowMatchSampler(steps=6, shift=2.0).sample(model, noise, cond, None, uncond, None, guidance=guidance)
    # v_u + w (v_c - v_u) is the exact velocity towards 0 + w (a - 0): straight paths, so Euler is exact
    assert torch.allclose(x0, guidance * a, atol=1e-5)
    assert model.batches == [1 if guidance == 1.0 else 2] * 6  # cond and uncond in one forward


def test_given_frames_are_held():
    a = torch.randn(1, 2, 3, 4, 4)
    cond_latents, cond_mask = torch.randn(1, 2, 3, 4, 4), torch.tensor([[1.0, 0.0, 0.0]])
    x0 = FlowMatchSampler(steps=3).sample(Oracle(a), torch.randn(1, 2, 3, 4, 4), torch.ones(1, 1, 1), None,
                                          torch.zeros(1, 1, 1), None, cond_latents=cond_latents, cond_mask=cond_mask)
    assert torch.equal(x0[:, :, 0], cond_latents[:, :, 0])
    assert torch.allclose(x0[:, :, 1:], 4.5 * a[:, :, 1:], atol=1e-5)


def test_the_model_sees_only_the_given_frames_latents_as_in_training():
    class Recorder(Oracle):
        def forward(self, x, t, text, text_mask, cond_latents=None, cond_mask=None):
            self.seen = cond_latents
            return super().forward(x, t, text, text_mask)

    model, cond_latents = Recorder(torch.zeros(1)), torch.randn(1, 2, 3, 4, 4)  # an encoder fills every frame
    FlowMatchSampler(steps=2).sample(model, torch.randn(1, 2, 3, 4, 4), torch.ones(1, 1, 1), None, torch.zeros(1, 1, 1),
                                     None, cond_latents=cond_latents, cond_mask=torch.tensor([[0.0, 0.0, 1.0]]))
    assert torch.equal(model.seen[:1, :, 2], cond_latents[:, :, 2]) and not model.seen[:, :, :2].any()
    assert torch.equal(model.seen[0], model.seen[1])  # the unconditional half sees the same


def test_guidance_needs_the_unconditional_states():
    with pytest.raises(ValueError, match="unconditional"):
        FlowMatchSampler().sample(Oracle(torch.zeros(1)), torch.randn(1, 1, 1, 1, 1), torch.ones(1, 1, 1), None)


def test_frame_masks_cover_the_tasks():
    masks = random_frame_masks(400, 4, {"i2v": 0.2, "extend": 0.2, "extend_backward": 0.2, "interpolate": 0.2},
                               generator=torch.Generator().manual_seed(0))
    rows = {tuple(m.tolist()) for m in masks}
    assert (0, 0, 0, 0) in rows and (1, 0, 0, 0) in rows and (1, 0, 0, 1) in rows and (1, 1, 1, 0) in rows
    assert (0, 1, 1, 1) in rows and (0, 0, 0, 1) in rows  # backward extension: a given suffix
    assert all(m.sum() < 4 for m in masks)  # something is always left to generate


def test_a_mix_of_one_task_gives_only_its_masks():
    masks = random_frame_masks(200, 4, {"extend_backward": 1.0}, generator=torch.Generator().manual_seed(0))
    assert all(m[-1] == 1 and m[0] == 0 and (m.diff() >= 0).all() for m in masks)  # a given suffix, every one


def test_training_loss_is_seeded_and_differentiable():
    torch.manual_seed(0)
    dit = VideoDiT(DiTConfig(hidden_size=32, num_layers=1, num_heads=2, freq_dim=32, latent_channels=4, text_dim=8))
    x0, text, mask = torch.randn(3, 4, 2, 8, 8), torch.randn(3, 5, 8), torch.ones(3, 5, dtype=torch.bool)
    uncond, uncond_mask = torch.zeros(1, 5, 8), torch.ones(1, 5, dtype=torch.bool)

    def loss(seed):
        return flow_matching_loss(dit, x0, text, mask, uncond_text=uncond, uncond_mask=uncond_mask,
                                  generator=torch.Generator().manual_seed(seed))

    first = loss(1)
    assert first.ndim == 0 and torch.isfinite(first) and torch.equal(first, loss(1)) and first != loss(2)
    first.backward()
    assert dit.proj_out.weight.grad.abs().sum() > 0
