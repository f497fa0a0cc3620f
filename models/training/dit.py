"""Phases 2 and 3: the caches the DiT trains on, then the diffusion transformer (`dit/`).

2. Latent cache (`latents-rank{r}.pt`): `latent_clips` fresh clips per run, encoded once with the
   final VAE; caption states for all of `source.captions` and the empty caption (`text_cache.pt`).
3. DiT: rectified flow (`models.sampler.flow_matching_loss`): logit-normal t, random
   frame-conditioning masks (i2v / extend forward and backward / interpolate: some latent frames
   given clean), caption dropout (`text_dropout`, the empty caption) for classifier-free guidance;
   an EMA of the weights, written as `dit/final.safetensors`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import torch

from models.config import ModelConfig
from models.dit import VideoDiT
from models.sampler import flow_matching_loss
from models.training.config import TrainConfig
from models.training.data import ClipSource, prefetched, to_tensor
from models.training.engine import EMA, Phase, Run, initial_modules, make_engine, run_phase, seed_for
from models.training.vae import load_final_vae
from models.vae import VideoAutoencoder
from models.weights import save_weights

# --- phase 2: caches ------------------------------------------------------------------------


def text_cache(cfg: TrainConfig, model_cfg: ModelConfig, captions: list[str], run: Run) -> dict:
    """{"captions", "index", "states" (N, L, D), "mask" (N, L), "empty_states", "empty_mask"},
    computed once (rank 0) and kept in out_dir/text_cache.pt."""
    path = run.out / "text_cache.pt"
    if run.rank == 0 and not path.exists():
        from models.text import TextEncoder

        t0 = time.monotonic()
        enc = TextEncoder(model_cfg.text, cache_size=0)
        states, mask = zip(*(enc.encode([c]) for c in captions))
        empty_states, empty_mask = enc.empty(1)
        cache = {"captions": list(captions), "states": torch.cat(states).half(), "mask": torch.cat(mask),
                 "empty_states": empty_states.clone(), "empty_mask": empty_mask.clone(),
                 "text": asdict(model_cfg.text)}
        tmp = path.with_suffix(".tmp")
        torch.save(cache, tmp)
        os.replace(tmp, path)
        run.log("text_cache", captions=len(captions), seconds=round(time.monotonic() - t0, 1))
    run.barrier()
    cache = torch.load(path, weights_only=False)
    cache["index"] = {c: i for i, c in enumerate(cache["captions"])}
    return cache


def _latent_chunk_at(source: ClipSource, cfg: TrainConfig, rank: int, chunk: int,
                     start: int) -> tuple[np.ndarray, list[str]]:
    """Clips `start` .. `start + chunk` (at most `latent_clips`) of a rank's latent cache: a pure
    function of `start`, so a paused encoding goes on where it stopped."""
    n = min(chunk, cfg.latent_clips - start)
    return source.sample(np.random.default_rng(seed_for(cfg, 3, rank, start)), n)


@torch.no_grad()
def latent_cache(cfg: TrainConfig, vae: VideoAutoencoder, source: ClipSource, text: dict, run: Run,
                 chunk: int = 16) -> dict:
    """{"latents" (N, C, T', H', W') fp16, "caption_ids" (N,)} of `latent_clips` fresh clips for this
    rank, encoded (posterior mean, scaled) once and kept in out_dir/latents-rank{r}.pt. Encoding
    resumes from a partial file."""
    path = run.out / f"latents-rank{run.rank}.pt"
    part = path.with_suffix(".part")
    if path.exists():
        return torch.load(path, weights_only=False)
    done = torch.load(part, weights_only=False) if part.exists() else {"latents": [], "caption_ids": []}
    n_done = sum(len(x) for x in done["latents"])
    t0, last_save = time.monotonic(), time.monotonic()
    vae = vae.to(run.device)
    starts = range(n_done, cfg.latent_clips, chunk)
    fn = functools.partial(_latent_chunk_at, source, cfg, run.rank, chunk)
    with prefetched(fn, starts, cfg.data_workers) as feed:
        for clips, captions in feed:
            if run.out_of_time():
                torch.save(done, part)
                run.log("paused", phase="latents", clips=n_done)
                return {}
            z = vae.encode(to_tensor(clips).to(run.device)).float().cpu()
            done["latents"].append(z.half())
            done["caption_ids"].append(torch.tensor([text["index"][c] for c in captions]))
            n_done += len(clips)
            if time.monotonic() - last_save > 60:
                torch.save(done, part)
                last_save = time.monotonic()
                run.log("latents", clips=n_done, seconds=round(time.monotonic() - t0, 1))
    cache = {"latents": torch.cat(done["latents"]), "caption_ids": torch.cat(done["caption_ids"])}
    torch.save(cache, path)
    part.unlink(missing_ok=True)
    z = cache["latents"].float()
    run.log("latents", clips=len(z), seconds=round(time.monotonic() - t0, 1), mean=float(z.mean()),
            std=float(z.std()))
    return cache


# --- phase 3: the DiT -----------------------------------------------------------------------


def dit_step(engine, x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, uncond: torch.Tensor,
             uncond_mask: torch.Tensor, cfg: TrainConfig, generator: torch.Generator) -> float:
    """One optimiser step of rectified flow on clean latents x0 (B, C, T', H', W')."""
    dtype = next(engine.module.parameters()).dtype
    dev = engine.device
    loss = flow_matching_loss(engine, x0.to(dev, dtype), text.to(dev, dtype), text_mask.to(dev),
                              uncond_text=uncond.to(dev, dtype), uncond_mask=uncond_mask.to(dev),
                              text_dropout=cfg.text_dropout, shift=cfg.timestep_shift,
                              high_noise_share=cfg.high_noise_share, cond_probs=cfg.cond_mix, generator=generator)
    engine.backward(loss)
    engine.step()
    return loss.item()


def _dit_batches(data: dict, text: dict, cfg: TrainConfig, rank: int,
                 start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]]:
    """(latents, caption states, caption mask, the step's generator) of the steps from `start` on:
    latents drawn from the cache with the step's own generator, which the step goes on using."""
    latents, caption_ids = data["latents"], data["caption_ids"]
    states, masks = text["states"], text["mask"]
    for step in range(start, cfg.dit_steps):
        g = torch.Generator().manual_seed(seed_for(cfg, 5, rank, step))
        idx = torch.randint(0, len(latents), (cfg.dit_batch,), generator=g)
        ids = caption_ids[idx]
        yield latents[idx].float(), states[ids].float(), masks[ids], g


def train_dit(cfg: TrainConfig, model_cfg: ModelConfig, source: ClipSource, run: Run) -> bool:
    """Phases 2 and 3; True when it has run all `dit_steps`."""
    if (run.out / "dit" / "final.safetensors").exists():
        return True
    vae = load_final_vae(run.out, model_cfg)
    text = text_cache(cfg, model_cfg, source.captions, run)
    data = latent_cache(cfg, vae, source, text, run)
    if not data:
        return False
    del vae
    torch.manual_seed(seed_for(cfg, 4, 0, 0))  # same initial weights on every rank
    dit = VideoDiT(model_cfg.dit)
    if cfg.init_from:
        dit.load_state_dict(initial_modules(cfg)["dit"].state_dict())
    ema = EMA(dit, cfg.ema_decay)
    engine, _, scheduler = make_engine(dit, cfg.dit_lr, cfg.weight_decay, cfg.dit_steps, cfg, cfg.dit_batch,
                                       run.world, run.device)
    uncond, uncond_mask = text["empty_states"], text["empty_mask"]

    def batches(start: int):
        return contextlib.nullcontext(_dit_batches(data, text, cfg, run.rank, start))

    def train_step(batch: tuple, step: int) -> dict:
        x0, states, mask, g = batch
        return {"loss": dit_step(engine, x0, states, mask, uncond, uncond_mask, cfg, g)}

    done = run_phase(Phase("dit", engine, scheduler, cfg.dit_steps, cfg.dit_batch, batches, train_step, ema=ema,
                           start_fields={"latent_clips": len(data["latents"])}), run)
    if done is None:
        return False
    if run.rank == 0:
        save_weights(ema.state_dict(), str(run.out / "dit" / "final.safetensors"))
        with open(run.out / "dit" / "final.json", "w") as f:
            json.dump({"steps": done.steps, "wall_s": done.wall_s, "params": done.params, "ema_decay": cfg.ema_decay},
                      f, indent=2)
    run.barrier()
    run.log("done", phase="dit", step=done.steps, wall_s=round(done.wall_s, 1))
    return True
