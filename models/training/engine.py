"""Training: the video autoencoder, then the diffusion transformer, on DeepSpeed engines.

Pure torch + DeepSpeed (no Ray): `pipeline/train.py` runs `train_model` in each Ray Train worker,
or in one plain process. The data comes from a `ClipSource` (the shapes world in practice):

    source.captions              every training caption (encoded once, cached)
    source.sample(rng, n)        (uint8 clips (n, T, H, W, 3), captions) of fresh random clips

Phases, each resumable from its own DeepSpeed checkpoints under `out_dir`:

1. VAE (`vae/`): random clips, cropped to `vae_crop` pixels and `vae_frames` frames around the
   object (the VAE is convolutional, so small crops train it at a fraction of the cost), loss =
   L1 + L2 + an object-weighted L1 + an L1 on spatial gradients (edges) + an L1 on frame-to-frame
   steps (`temporal_weight`) + `kl_weight` * KL.
   Then the latent scale: `scaling_factor = 1 / std`, `shift_factor = mean` of the posterior mean
   over fresh clips (SD's recipe), written to `vae/final.json` with the weights. With
   `vae_decoder_only` (and `init_from`) only the decoder trains and the init's latent scale is
   kept, so the init's DiT still fits (and is exported as it is when there is no DiT phase).
2. Latent cache (`latents-rank{r}.pt`): `latent_clips` fresh clips per run, encoded once with the
   final VAE; caption states for all of `source.captions` and the empty caption (`text_cache.pt`).
3. DiT (`dit/`): rectified flow (`models.sampler.flow_matching_loss`): logit-normal t, random
   frame-conditioning masks (i2v / extend forward and backward / interpolate: some latent frames given clean), caption
   dropout (`text_dropout`, the empty caption) for classifier-free guidance; an EMA of the weights.
4. Export (`export_weights`): `{vae.*, dit.* (EMA)}` as one safetensors file and its sha256 (with
   no DiT phase, the DiT of `init_from`).

A step function runs over a DeepSpeed engine (`deepspeed.initialize`, ZeRO stage 1 or 2; fp32 on
CPU, bf16 on GPU). On CPU, `DS_ACCELERATOR=cpu` and `deepspeed.init_distributed("gloo")` (which
JIT-compiles a comm op once per venv, ~40-80 s; cached in TORCH_EXTENSIONS_DIR afterwards).
Every `checkpoint_every` steps, and when a phase ends or its time runs out, the engine saves
model + optimizer + LR-scheduler state, the EMA, the step and the wall time spent; a new run with
`resume=True` continues from the latest. Rank 0 writes the loss curves (`loss_vae.csv`,
`loss_dit.csv`) and `train_log.jsonl`.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import json
import math
import os
import shutil
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn as nn

from models.config import ModelConfig, load_config
from models.dit import VideoDiT
from models.sampler import flow_matching_loss
from models.training.config import TrainConfig
from models.vae import VideoAutoencoder, convert_temporal_upsample
from models.weights import build_modules, save_weights


class ClipSource(Protocol):
    """Where training clips come from (see the module docstring)."""

    captions: list[str]

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        ...


# --- distributed setup ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device): DeepSpeed's process group, created here unless one exists.

    A lone process gets a one-rank group on loopback. CPU-only machines use gloo and DeepSpeed's
    CPU accelerator (DS_ACCELERATOR=cpu, set here before deepspeed is imported).
    """
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                           ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


def ds_config(batch: int, world: int, zero_stage: int, grad_clip: float, on_gpu: bool) -> dict:
    """The DeepSpeed config of one phase (the optimiser and scheduler are passed in as objects)."""
    return {
        "train_batch_size": batch * world,
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": on_gpu},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `floor` at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_engine(module: nn.Module, lr: float, weight_decay: float, steps: int, cfg: TrainConfig,
                batch: int, world: int, device: torch.device):
    """(engine, optimizer, scheduler) for a module: AdamW + warm-up/cosine under ZeRO."""
    import deepspeed

    on_gpu = device.type == "cuda"
    module.to(device)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler,
        config=ds_config(batch, world, cfg.zero_stage, cfg.grad_clip, on_gpu))
    return engine, optimizer, scheduler


# --- run state: logs, checkpoints, deadline -------------------------------------------------


class Run:
    """Paths, the deadline, and rank-0 logging of one training call."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = None if cfg.minutes is None else self.t0 + 60.0 * cfg.minutes

    def out_of_time(self) -> bool:
        """Whether the budget is spent; ranks agree (rank 0 decides)."""
        over = self.deadline is not None and time.monotonic() >= self.deadline
        if self.world > 1:
            import torch.distributed as dist

            flag = torch.tensor([1.0 if over else 0.0], device=self.device)
            dist.broadcast(flag, src=0)
            over = bool(flag.item())
        return over

    def log(self, event: str, **fields) -> None:
        if self.rank:
            return
        row = {"event": event, "time": time.time(), **fields}
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    def curve(self, name: str, row: dict) -> None:
        if self.rank:
            return
        path = self.out / f"loss_{name}.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)


def _seed_for(cfg: TrainConfig, phase: int, rank: int, step: int) -> int:
    return (cfg.seed * 1_000_003 + phase * 7919 + rank * 104_729 + step) % (2 ** 63)


def save_checkpoint(engine, ckpt_dir: Path, step: int, client_state: dict, keep: int) -> None:
    """DeepSpeed checkpoint `step{N}` (model, optimizer, scheduler, client state); older ones pruned."""
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step}", client_state=client_state)
    if engine.global_rank == 0:
        tags = sorted((p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:]))
        for old in tags[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def load_latest(engine, ckpt_dir: Path) -> dict | None:
    """Client state of the latest checkpoint, loaded into the engine; None when there is none."""
    if not (ckpt_dir / "latest").exists():
        return None
    path, client_state = engine.load_checkpoint(str(ckpt_dir), load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
    if path is None:
        return None
    return client_state


# --- data -----------------------------------------------------------------------------------


def to_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) → float (B, 3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


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
    rng = np.random.default_rng(_seed_for(cfg, 1, rank, step))
    clips, _ = source.sample(rng, cfg.vae_batch)
    return crop_clips(clips, cfg.vae_crop, cfg.vae_frames, rng)


def _latent_chunk_at(source: ClipSource, cfg: TrainConfig, rank: int, chunk: int, start: int) -> tuple[np.ndarray, list[str]]:
    """Clips `start` .. `start + chunk` (at most `latent_clips`) of a rank's latent cache: a pure
    function of `start`, so a paused encoding goes on where it stopped."""
    n = min(chunk, cfg.latent_clips - start)
    return source.sample(np.random.default_rng(_seed_for(cfg, 3, rank, start)), n)


@contextlib.contextmanager
def prefetched(fn: Callable, keys, workers: int):
    """An iterator over `fn(key)` for `keys` in order. With `workers` > 0 the calls run up to
    2 x workers keys ahead in that many spawned processes (`fn` must pickle); the pool is shut
    down when the block is left, also early."""
    if workers <= 0:
        yield (fn(k) for k in keys)
        return
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def results():
        it, pending = iter(keys), collections.deque()
        for key in it:
            pending.append(pool.submit(fn, key))
            if len(pending) >= 2 * workers:
                break
        while pending:
            done = pending.popleft().result()
            for key in it:
                pending.append(pool.submit(fn, key))
                break
            yield done

    try:
        yield results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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


# --- EMA ------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's float parameters, with DiT's warm-up of the decay."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.cpu() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.shadow = {k: v.detach().float().clone() for k, v in state.items()}


# --- phase 1: the VAE -----------------------------------------------------------------------


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
    ckpt = run.out / "vae" / "ckpt"
    final = run.out / "vae" / "final.safetensors"
    if final.exists() and (run.out / "vae" / "final.json").exists():
        return True
    torch.manual_seed(_seed_for(cfg, 1, run.rank, 0))
    vae = VideoAutoencoder(model_cfg.vae)
    if cfg.init_from:
        vae.load_state_dict(convert_temporal_upsample(initial_modules(cfg)["vae"].state_dict(), vae))
    else:
        init_posterior_logvar(vae, cfg.init_logvar)
    if cfg.vae_decoder_only:  # the latent space stays the init's, and so does its DiT
        vae.encoder.requires_grad_(False)
    engine, _, scheduler = make_engine(vae, cfg.vae_lr, 0.0, cfg.vae_steps, cfg, cfg.vae_batch, run.world, run.device)
    step, wall = 0, 0.0
    state = load_latest(engine, ckpt) if cfg.resume else None
    if state is not None:
        step, wall = int(state["step"]), float(state["wall_s"])
        run.log("resume", phase="vae", step=step, wall_s=wall)
    params = sum(p.numel() for p in vae.parameters())
    run.log("start", phase="vae", step=step, params=params, batch=cfg.vae_batch, world=run.world)
    engine.train()
    t_last, n_since, t_mark = time.monotonic(), 0, time.monotonic()
    acc: dict[str, float] = {}
    start = step
    batches = prefetched(functools.partial(_vae_batch, source, cfg, run.rank), range(step, cfg.vae_steps),
                         cfg.data_workers)
    with batches as feed:
        for crops in feed:
            if run.out_of_time() or (step == cfg.pause_at and step > start):
                break
            gen = torch.Generator().manual_seed(_seed_for(cfg, 11, run.rank, step))
            parts = vae_step(engine, to_tensor(crops), cfg, gen)
            step += 1
            n_since += 1
            for k, v in parts.items():
                acc[k] = acc.get(k, 0.0) + v
            if step % cfg.log_every == 0 or step == cfg.vae_steps:
                now = time.monotonic()
                wall += now - t_mark
                t_mark = now
                row = {"step": step, "wall_s": round(wall, 2), **{k: round(v / n_since, 6) for k, v in acc.items()},
                       "lr": scheduler.get_last_lr()[0], "clips_per_s": round(n_since * cfg.vae_batch * run.world / (now - t_last), 3)}
                run.curve("vae", row)
                run.log("step", phase="vae", **row)
                acc, n_since, t_last = {}, 0, now
            if step % cfg.checkpoint_every == 0:
                save_checkpoint(engine, ckpt, step, {"step": step, "wall_s": wall + time.monotonic() - t_mark},
                                cfg.keep_checkpoints)
    wall += time.monotonic() - t_mark
    if step < cfg.vae_steps:
        save_checkpoint(engine, ckpt, step, {"step": step, "wall_s": wall}, cfg.keep_checkpoints)
        run.log("paused", phase="vae", step=step, wall_s=round(wall, 1))
        return False
    if not (ckpt / f"step{step}").exists():
        save_checkpoint(engine, ckpt, step, {"step": step, "wall_s": wall}, cfg.keep_checkpoints)
    vae = engine.module.float().cpu().eval()
    if cfg.vae_decoder_only:  # same encoder, same latents: the DiT's scale must not move
        init_vae = load_config(cfg.init_from).vae
        scale, shift = init_vae.scaling_factor, init_vae.shift_factor
    else:
        scale, shift = latent_statistics(vae, source, cfg, run)
    if run.rank == 0:
        save_weights(vae.state_dict(), str(final))
        with open(run.out / "vae" / "final.json", "w") as f:
            json.dump({"steps": step, "wall_s": wall, "scaling_factor": scale, "shift_factor": shift,
                       "params": params}, f, indent=2)
    _barrier(run)
    run.log("done", phase="vae", step=step, wall_s=round(wall, 1), scaling_factor=scale, shift_factor=shift)
    return True


@torch.no_grad()
def latent_statistics(vae: VideoAutoencoder, source: ClipSource, cfg: TrainConfig, run: Run,
                      clips: int = 64) -> tuple[float, float]:
    """(1 / std, mean) of the raw posterior means of fresh clips: the DiT's latent scale."""
    rng = np.random.default_rng(_seed_for(cfg, 2, 0, 0))
    means = []
    for _ in range(0, clips, 16):
        x, _ = source.sample(rng, 16)
        means.append(vae.encoder(to_tensor(x)).chunk(2, dim=1)[0].flatten())
    m = torch.cat(means)
    return float(1.0 / m.std().clamp_min(1e-6)), float(m.mean())


def _barrier(run: Run) -> None:
    if run.world > 1:
        import torch.distributed as dist

        dist.barrier()


def load_final_vae(out_dir: str | Path, model_cfg: ModelConfig) -> VideoAutoencoder:
    """The trained VAE of a run, with its latent scale set in `model_cfg.vae` (mutated)."""
    from models.weights import load_weights

    out = Path(out_dir) / "vae"
    info = json.loads((out / "final.json").read_text())
    model_cfg.vae.scaling_factor = info["scaling_factor"]
    model_cfg.vae.shift_factor = info["shift_factor"]
    vae = VideoAutoencoder(model_cfg.vae)
    state, _ = load_weights(str(out / "final.safetensors"))
    vae.load_state_dict(state)
    return vae.eval().requires_grad_(False)


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
    _barrier(run)
    cache = torch.load(path, weights_only=False)
    cache["index"] = {c: i for i, c in enumerate(cache["captions"])}
    return cache


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
    run.log("latents", clips=len(z), seconds=round(time.monotonic() - t0, 1), mean=float(z.mean()), std=float(z.std()))
    return cache


# --- starting from a trained model -----------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _initial_modules(spec: str) -> nn.ModuleDict:
    from models.weights import load_modules

    modules, _ = load_modules(load_config(spec))
    return modules


def initial_modules(cfg: TrainConfig) -> nn.ModuleDict:
    """The modules of `cfg.init_from` (a shipped name, config path or URI), weights checked; read
    once per process for both phases."""
    return _initial_modules(cfg.init_from)


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
            json.dump({"steps": 0, "wall_s": 0.0, "init_from": cfg.init_from, "scaling_factor": init_cfg.vae.scaling_factor,
                       "shift_factor": init_cfg.vae.shift_factor}, f, indent=2)
        run.log("adopt", phase="vae", init_from=cfg.init_from)
    _barrier(run)


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


def train_dit(cfg: TrainConfig, model_cfg: ModelConfig, source: ClipSource, run: Run) -> bool:
    """Phase 3; True when it has run all `dit_steps`."""
    ckpt = run.out / "dit" / "ckpt"
    if (run.out / "dit" / "final.safetensors").exists():
        return True
    vae = load_final_vae(run.out, model_cfg)
    text = text_cache(cfg, model_cfg, source.captions, run)
    data = latent_cache(cfg, vae, source, text, run)
    if not data:
        return False
    del vae
    torch.manual_seed(_seed_for(cfg, 4, 0, 0))  # same initial weights on every rank
    dit = VideoDiT(model_cfg.dit)
    if cfg.init_from:
        dit.load_state_dict(initial_modules(cfg)["dit"].state_dict())
    ema = EMA(dit, cfg.ema_decay)
    engine, _, scheduler = make_engine(dit, cfg.dit_lr, cfg.weight_decay, cfg.dit_steps, cfg, cfg.dit_batch,
                                       run.world, run.device)
    step, wall = 0, 0.0
    state = load_latest(engine, ckpt) if cfg.resume else None
    if state is not None:
        step, wall = int(state["step"]), float(state["wall_s"])
        ema.load_state_dict(state["ema"])
        run.log("resume", phase="dit", step=step, wall_s=wall)
    params = sum(p.numel() for p in dit.parameters())
    run.log("start", phase="dit", step=step, params=params, batch=cfg.dit_batch, world=run.world,
            latent_clips=len(data["latents"]))
    latents, caption_ids = data["latents"], data["caption_ids"]
    states, masks = text["states"], text["mask"]
    uncond, uncond_mask = text["empty_states"], text["empty_mask"]
    engine.train()
    acc, n_since = 0.0, 0
    t_last = t_mark = time.monotonic()

    def client_state():
        return {"step": step, "wall_s": wall + time.monotonic() - t_mark, "ema": ema.state_dict()}

    start = step
    while step < cfg.dit_steps:
        if run.out_of_time() or (step == cfg.pause_at and step > start):
            break
        g = torch.Generator().manual_seed(_seed_for(cfg, 5, run.rank, step))
        idx = torch.randint(0, len(latents), (cfg.dit_batch,), generator=g)
        ids = caption_ids[idx]
        loss = dit_step(engine, latents[idx].float(), states[ids].float(), masks[ids], uncond, uncond_mask, cfg, g)
        step += 1
        ema.update(engine.module, step)
        acc += loss
        n_since += 1
        if step % cfg.log_every == 0 or step == cfg.dit_steps:
            now = time.monotonic()
            wall += now - t_mark
            t_mark = now
            row = {"step": step, "wall_s": round(wall, 2), "loss": round(acc / n_since, 6),
                   "lr": scheduler.get_last_lr()[0],
                   "clips_per_s": round(n_since * cfg.dit_batch * run.world / (now - t_last), 3)}
            run.curve("dit", row)
            run.log("step", phase="dit", **row)
            acc, n_since, t_last = 0.0, 0, now
        if step % cfg.checkpoint_every == 0:
            save_checkpoint(engine, ckpt, step, client_state(), cfg.keep_checkpoints)
    if step < cfg.dit_steps:
        save_checkpoint(engine, ckpt, step, client_state(), cfg.keep_checkpoints)
        run.log("paused", phase="dit", step=step, wall_s=round(wall + time.monotonic() - t_mark, 1))
        return False
    if not (ckpt / f"step{step}").exists():
        save_checkpoint(engine, ckpt, step, client_state(), cfg.keep_checkpoints)
    wall += time.monotonic() - t_mark
    if run.rank == 0:
        save_weights(ema.state_dict(), str(run.out / "dit" / "final.safetensors"))
        with open(run.out / "dit" / "final.json", "w") as f:
            json.dump({"steps": step, "wall_s": wall, "params": params, "ema_decay": cfg.ema_decay}, f, indent=2)
    _barrier(run)
    run.log("done", phase="dit", step=step, wall_s=round(wall, 1))
    return True


def dit_weights_from_checkpoint(out_dir: str | Path, model_cfg: ModelConfig, ema: bool = True) -> dict[str, torch.Tensor]:
    """The DiT weights (EMA or raw) of the latest DiT checkpoint, read without DeepSpeed."""
    ckpt = Path(out_dir) / "dit" / "ckpt"
    tag = (ckpt / "latest").read_text().strip()
    state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    if ema:
        return state["ema"]
    return {k: v.float() for k, v in state["module"].items()}


# --- export ---------------------------------------------------------------------------------


def export_weights(out_dir: str | Path, model_cfg: ModelConfig, path: str | Path,
                   dit_state: dict[str, torch.Tensor] | None = None,
                   metadata: dict[str, str] | None = None) -> tuple[str, ModelConfig]:
    """Write `{vae.*, dit.*}` of a run as one safetensors file; (sha256, the config it fits).

    The DiT is `dit/final.safetensors` (EMA) unless `dit_state` is given (e.g. from
    `dit_weights_from_checkpoint` for a run stopped early). The returned config is `model_cfg`
    with the VAE's latent scale filled in and `weights`/`weights_sha256` pointing at the file.
    """
    from models.weights import load_weights

    model_cfg = copy.deepcopy(model_cfg)
    vae = load_final_vae(out_dir, model_cfg)
    if dit_state is None:
        dit_state, _ = load_weights(str(Path(out_dir) / "dit" / "final.safetensors"))
    modules = build_modules(model_cfg)
    modules["vae"].load_state_dict(vae.state_dict())
    modules["dit"].load_state_dict(dit_state)
    meta = {"format": "pt", "model": model_cfg.name, **(metadata or {})}
    sha = save_weights(modules.state_dict(), str(path), metadata=meta)
    model_cfg.weights, model_cfg.weights_sha256 = str(path), sha
    return sha, model_cfg


# --- all phases -----------------------------------------------------------------------------


def train_model(cfg: TrainConfig, source: ClipSource, report: Callable[[dict], None] | None = None) -> dict:
    """VAE → caches → DiT → export, resumable; the entry point of every worker (and of a lone
    process). Returns a summary (rank 0's paths and figures; `finished` False when the time ran out)."""
    cfg.check_init_from()  # before any process group or file: a wrong --init-from fails at once
    rank, world, device = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run = Run(cfg, rank, world, device)
    model_cfg = cfg.model_config()
    if rank == 0:
        with open(run.out / "train_config.json", "w") as f:
            json.dump({"train": asdict(cfg), "model": model_cfg.to_dict()}, f, indent=2, default=str)
    summary: dict = {"out_dir": str(run.out), "rank": rank, "world": world, "finished": False}
    if cfg.init_from and not cfg.vae_steps:
        adopt_vae(cfg, run)
    if cfg.vae_steps and not train_vae(cfg, model_cfg, source, run):
        summary["phase"] = "vae"
        return _report(summary, report)
    if cfg.dit_steps and not train_dit(cfg, model_cfg, source, run):
        summary["phase"] = "dit"
        return _report(summary, report)
    summary.update(finished=True, phase="done")
    if (cfg.dit_steps or cfg.init_from) and rank == 0:
        path = cfg.export_path or str(run.out / "model.safetensors")
        # no DiT phase: the init's DiT as it is (e.g. after --vae-decoder-only)
        dit_state = None if cfg.dit_steps else initial_modules(cfg)["dit"].state_dict()
        sha, _ = export_weights(run.out, model_cfg, path, dit_state=dit_state)
        summary.update(weights=path, weights_sha256=sha)
        run.log("export", weights=path, sha256=sha)
    summary["seconds"] = round(time.monotonic() - run.t0, 1)
    return _report(summary, report)


def _report(summary: dict, report: Callable[[dict], None] | None) -> dict:
    if report is not None:
        report(summary)
    return summary
