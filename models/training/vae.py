"""Phase 1: the video autoencoder (`vae/`).

Random clips, cropped to `vae_crop` pixels and `vae_frames` frames around the object (the VAE is
convolutional, so small crops train it at a fraction of the cost), loss = L1 + L2 + an
object-weighted L1 + an L1 on spatial gradients (edges) + an L1 on frame-to-frame steps
(`temporal_weight`) + `kl_weight` * KL.

Then the latent scale: `scaling_factor = 1 / std`, `shift_factor = mean` of the posterior mean over
fresh clips (SD's recipe), written to `vae/final.json` with the weights. With `vae_decoder_only`
(and `init_from`) only the decoder trains and the init's latent scale is kept, so the init's DiT
still fits (and is exported as it is when there is no DiT phase). With `init_from` and no VAE steps
the init's autoencoder is taken as it is (`adopt_vae`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from models.config import ModelConfig, load_config
from models.training.config import TrainConfig
from models.training.data import ClipSource, prefetched, to_tensor
from models.training.engine import Phase, Run, initial_modules, make_engine, run_phase, seed_for
from models.vae import VideoAutoencoder, convert_temporal_upsample
from models.weights import load_weights, save_weights


def crop_clips(clips: np.ndarray, size: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of `frames` frames and a `size` x `size` crop per clip, the crop centred near
    the object (pixels far from the corner colour) so that most crops hold an edge to learn."""
    b, t, h, w, _ = clips.shape
    frames = frames or t
    size_h, size_w = (size or h), (size or w)
    out = np.empty((b, frames, size_h, size_w, 3), dtype=clips.dtype)
    for i in range(b):
        t0 = int(rng.integers(0, t - frames + 1))
        window = clips[i, t0:t0 + frames]
        mid = window[frames // 2].astype(np.int16)
        fg = np.abs(mid - mid[0, 0]).sum(-1) > 60
        if fg.any() and rng.random() < 0.85:
            ys, xs = np.nonzero(fg)
            cy, cx = ys.mean() + rng.normal(0, size_h / 6), xs.mean() + rng.normal(0, size_w / 6)
        else:
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        y0 = int(np.clip(round(cy - size_h / 2), 0, h - size_h))
        x0 = int(np.clip(round(cx - size_w / 2), 0, w - size_w))
        out[i] = window[:, y0:y0 + size_h, x0:x0 + size_w]
    return out


def _vae_batch(source: ClipSource, cfg: TrainConfig, rank: int, step: int) -> np.ndarray:
    """The VAE's uint8 training crops of one step (a pure function of the step: resumable, and
    computable in any process)."""
    rng = np.random.default_rng(seed_for(cfg, 1, rank, step))
    clips, _ = source.sample(rng, cfg.vae_batch)
    return crop_clips(clips, cfg.vae_crop, cfg.vae_frames, rng)


def vae_loss(recon: torch.Tensor, x: torch.Tensor, posterior, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """L1 + L2 + object-weighted L1 + edge L1 + temporal L1 + kl_weight * KL per latent element."""
    recon, x = recon.float(), x.float()
    err = (recon - x).abs()
    l1, l2 = err.mean(), (recon - x).pow(2).mean()
    median = x.flatten(2).median(dim=2).values[:, :, None, None, None]
    obj = ((x - median).abs().sum(1, keepdim=True) > 0.3).float()
    obj_l1 = (err * obj).sum() / obj.expand_as(err).sum().clamp_min(1.0)
    edge = ((recon.diff(dim=3) - x.diff(dim=3)).abs().mean() + (recon.diff(dim=4) - x.diff(dim=4)).abs().mean())
    temporal = (recon.diff(dim=2) - x.diff(dim=2)).abs().mean() if x.shape[2] > 1 else x.new_zeros(())
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    loss = (l1 + l2 + cfg.object_weight * obj_l1 + cfg.edge_weight * edge + cfg.temporal_weight * temporal
            + cfg.kl_weight * kl)
    return loss, {"l1": l1.item(), "l2": l2.item(), "obj_l1": obj_l1.item(), "edge": edge.item(),
                  "temporal": temporal.item(), "kl": kl.item()}


def init_posterior_logvar(vae: VideoAutoencoder, logvar: float) -> None:
    """Start the encoder's log-variance output at `logvar` (its last conv's bias): with the
    default 0 the sampled latents start as mostly noise (std 1 against means of ~0.3), which
    stalls the decoder for hundreds of steps."""
    c = vae.config.latent_channels
    with torch.no_grad():
        conv = vae.encoder.conv_out
        last = conv.temporal if conv.temporal is not None else conv.spatial
        last.bias[c:].fill_(logvar)


def vae_step(engine, x: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> dict:
    """One optimiser step of the VAE on pixel clips x (B, 3, T, H, W) in [-1, 1]."""
    module = engine.module
    x = x.to(engine.device, dtype=next(module.parameters()).dtype)
    posterior = module.encode(x, return_posterior=True)
    # z = mean + std * eps, eps drawn on the CPU from `generator` (repeatable on any device)
    eps = torch.randn(posterior.mean.shape, generator=generator).to(x.device, x.dtype)
    recon = module.decoder(posterior.mean + posterior.std * eps)
    loss, parts = vae_loss(recon, x, posterior, cfg)
    engine.backward(loss)
    engine.step()
    return {"loss": loss.item(), **parts}


def train_vae(cfg: TrainConfig, model_cfg: ModelConfig, source: ClipSource, run: Run) -> bool:
    """Phase 1; True when it has run all `vae_steps` (else it stopped on the deadline)."""
    final = run.out / "vae" / "final.safetensors"
    if final.exists() and (run.out / "vae" / "final.json").exists():
        return True
    torch.manual_seed(seed_for(cfg, 1, run.rank, 0))
    vae = VideoAutoencoder(model_cfg.vae)
    if cfg.init_from:
        vae.load_state_dict(convert_temporal_upsample(initial_modules(cfg)["vae"].state_dict(), vae))
    else:
        init_posterior_logvar(vae, cfg.init_logvar)
    if cfg.vae_decoder_only:  # the latent space stays the init's, and so does its DiT
        vae.encoder.requires_grad_(False)
    engine, _, scheduler = make_engine(vae, cfg.vae_lr, 0.0, cfg.vae_steps, cfg, cfg.vae_batch, run.world, run.device)

    def batches(start: int):
        return prefetched(functools.partial(_vae_batch, source, cfg, run.rank), range(start, cfg.vae_steps),
                          cfg.data_workers)

    def train_step(crops: np.ndarray, step: int) -> dict:
        gen = torch.Generator().manual_seed(seed_for(cfg, 11, run.rank, step))
        return vae_step(engine, to_tensor(crops), cfg, gen)

    done = run_phase(Phase("vae", engine, scheduler, cfg.vae_steps, cfg.vae_batch, batches, train_step), run)
    if done is None:
        return False
    vae = engine.module.float().cpu().eval()
    if cfg.vae_decoder_only:  # same encoder, same latents: the DiT's scale must not move
        init_vae = load_config(cfg.init_from).vae
        scale, shift = init_vae.scaling_factor, init_vae.shift_factor
    else:
        scale, shift = latent_statistics(vae, source, cfg, run)
    if run.rank == 0:
        save_weights(vae.state_dict(), str(final))
        with open(run.out / "vae" / "final.json", "w") as f:
            json.dump({"steps": done.steps, "wall_s": done.wall_s, "scaling_factor": scale, "shift_factor": shift,
                       "params": done.params}, f, indent=2)
    run.barrier()
    run.log("done", phase="vae", step=done.steps, wall_s=round(done.wall_s, 1), scaling_factor=scale,
            shift_factor=shift)
    return True


@torch.no_grad()
def latent_statistics(vae: VideoAutoencoder, source: ClipSource, cfg: TrainConfig, run: Run,
                      clips: int = 64) -> tuple[float, float]:
    """(1 / std, mean) of the raw posterior means of fresh clips: the DiT's latent scale."""
    rng = np.random.default_rng(seed_for(cfg, 2, 0, 0))
    means = []
    for _ in range(0, clips, 16):
        x, _ = source.sample(rng, 16)
        means.append(vae.encoder(to_tensor(x)).chunk(2, dim=1)[0].flatten())
    m = torch.cat(means)
    return float(1.0 / m.std().clamp_min(1e-6)), float(m.mean())


def load_final_vae(out_dir: str | Path, model_cfg: ModelConfig) -> VideoAutoencoder:
    """The trained VAE of a run, with its latent scale set in `model_cfg.vae` (mutated)."""
    out = Path(out_dir) / "vae"
    info = json.loads((out / "final.json").read_text())
    model_cfg.vae.scaling_factor = info["scaling_factor"]
    model_cfg.vae.shift_factor = info["shift_factor"]
    vae = VideoAutoencoder(model_cfg.vae)
    state, _ = load_weights(str(out / "final.safetensors"))
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)


def adopt_vae(cfg: TrainConfig, run: Run) -> None:
    """Phase 1 when `init_from` is set and `vae_steps` is 0: take that model's autoencoder and its
    latent scale as this run's, so its DiT (the starting point of phase 3) sees the latents it
    was trained on (`TrainConfig.check_init_from` has checked that the two match)."""
    final = run.out / "vae" / "final.safetensors"
    if run.rank == 0 and not (final.exists() and (run.out / "vae" / "final.json").exists()):
        init_cfg = load_config(cfg.init_from)
        final.parent.mkdir(parents=True, exist_ok=True)
        save_weights(initial_modules(cfg)["vae"].state_dict(), str(final))
        with open(run.out / "vae" / "final.json", "w") as f:
            json.dump({"steps": 0, "wall_s": 0.0, "init_from": cfg.init_from,
                       "scaling_factor": init_cfg.vae.scaling_factor, "shift_factor": init_cfg.vae.shift_factor},
                      f, indent=2)
        run.log("adopt", phase="vae", init_from=cfg.init_from)
    run.barrier()
