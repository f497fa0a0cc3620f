"""Training the default model on the shapes world, under Ray Train or in one plain process.

    from models.training.config import TrainConfig
    from pipeline.train import train

    cfg = TrainConfig(out_dir=".train/default", vae_steps=800, dit_steps=2500, minutes=80)
    summary = train(cfg)                               # one process, no Ray
    summary = train(cfg, num_workers=2, use_gpu=True)  # Ray Train: TorchTrainer, one rank per worker

The maths and the loop live in `models.training` (`models.training.train.train_model`), the data in
`models.shapes.source` (`ShapesWorldSource`: random scenes without the held-out colour-shape pairs,
their canonical captions); this module is the runner and the command line. Under Ray each worker
runs `train_model` with DeepSpeed over the process group that Ray Train's `TorchTrainer` created
(gloo on CPUs, NCCL on GPUs); every worker draws its own clips (seeded by rank), so the data is
sharded by construction and the out_dir (checkpoints, caches, loss curves) must be shared storage
on a multi-node cluster. On a 2-CPU machine use one worker with a fractional CPU
(`cpus_per_worker=0.5`): whole-CPU actors can starve Ray's own tasks there; the worker still uses
every core for torch (`threads`).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, replace

from models.shapes.source import ShapesWorldSource
from models.training.config import COND_PROBS, TrainConfig, format_cond_mix, parse_cond_mix

# --- running --------------------------------------------------------------------------------


def train(cfg: TrainConfig, num_workers: int | None = None, use_gpu: bool = False,
          cpus_per_worker: float | None = None, source: object | None = None) -> dict:
    """Run the training job: in this process when `num_workers` is None, else under Ray Train.

    Returns rank 0's summary (see `models.training.train.train_model`).
    """
    if num_workers is None:
        from models.training.train import (
            train_model,  # torch + DeepSpeed: only when training
        )

        return train_model(cfg, source or ShapesWorldSource())
    return train_ray(cfg, num_workers, use_gpu, cpus_per_worker)


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: `train_model` over the process group Ray Train set up."""
    import ray.train

    from models.training.train import train_model

    cfg = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    if cfg.threads is None:  # Ray pins OMP threads to the (fractional) CPU request; use the cores
        cfg = replace(cfg, threads=max(1, (os.cpu_count() or 1) // max(ctx.get_local_world_size(), 1)))
    summary = train_model(cfg, ShapesWorldSource(**config.get("source", {})))
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))})


def train_ray(cfg: TrainConfig, num_workers: int = 1, use_gpu: bool = False,
              cpus_per_worker: float | None = None) -> dict:
    """The job under Ray Train's `TorchTrainer` (joins a running cluster or starts a local one)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    if cpus_per_worker is None:
        total = ray.cluster_resources().get("CPU", 1.0)
        # leave Ray's own tasks room on a small node: fractional CPUs (STACK.md "Ray on 2 cores")
        cpus_per_worker = 1.0 if total / num_workers >= 4 else 0.5
    env = {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"train": asdict(cfg)},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"reelforge-train-{int(time.time())}",
                             storage_path=os.path.abspath(os.path.join(cfg.out_dir, "ray"))),
    )
    os.environ.update(env)  # propagated to the workers by Ray Train (and the driver's own imports)
    result = trainer.fit()
    return dict(result.metrics or {})


# --- command line (jobs/train_default.py and `reel train`) ---------------------------------


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a training run."""
    d = TrainConfig(out_dir="")
    p.add_argument("--out", required=True, help="output folder (checkpoints, caches, loss curves, weights)")
    p.add_argument("--model", default=d.model, help="model config to train (shipped name, .json, folder)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoints in --out")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="start from this trained model (shipped name, config or URI) instead of random weights; "
                        "with --vae-steps 0 its autoencoder is kept as it is")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps, help="VAE optimiser steps (0: skip)")
    p.add_argument("--dit-steps", type=int, default=d.dit_steps, help="DiT optimiser steps (0: skip)")
    p.add_argument("--vae-batch", type=int, default=d.vae_batch, help="VAE clips per step per worker")
    p.add_argument("--dit-batch", type=int, default=d.dit_batch, help="DiT clips per step per worker")
    p.add_argument("--vae-lr", type=float, default=d.vae_lr)
    p.add_argument("--dit-lr", type=float, default=d.dit_lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear LR warm-up of each phase")
    p.add_argument("--vae-crop", type=int, default=d.vae_crop, help="VAE training crop in pixels (0: whole clip)")
    p.add_argument("--vae-frames", type=int, default=d.vae_frames, help="VAE training window in frames (0: whole clip)")
    p.add_argument("--temporal-weight", type=float, default=d.temporal_weight,
                   help="weight of the VAE's L1 on frame-to-frame steps (motion not bunched at latent-frame edges)")
    p.add_argument("--vae-decoder-only", action="store_true",
                   help="train only the decoder, on the frozen encoder of --init-from: its latents and DiT stay valid "
                        "(with --dit-steps 0 its DiT is exported as it is)")
    p.add_argument("--latent-clips", type=int, default=d.latent_clips,
                   help="clips in the DiT's latent cache (per worker)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="decay of the DiT weights' moving average")
    p.add_argument("--timestep-shift", type=float, default=d.timestep_shift,
                   help="SD3 shift of the DiT's training noise levels (1: unshifted; >1 trains more at high noise)")
    p.add_argument("--high-noise-share", type=float, default=d.high_noise_share,
                   help="share of DiT samples drawn at noise levels 0.9-1, where a clip's layout and motion "
                        "are settled (0: none)")
    p.add_argument("--cond-mix", default=None, metavar="TASK=SHARE,…",
                   help="shares of DiT samples per frame-conditioning task, the rest text-to-video (default "
                        f"{format_cond_mix(COND_PROBS)}); tasks: {', '.join(COND_PROBS)}")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between loss-curve rows")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-time budget of this call; then checkpoint and stop (go on later with --resume)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--data-workers", type=int, default=d.data_workers,
                   help="processes drawing clips ahead of the steps (0: inline; give a GPU run most cores)")
    p.add_argument("--zero-stage", type=int, default=d.zero_stage, choices=(1, 2), help="DeepSpeed ZeRO stage")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (omit: one process, no Ray)")
    p.add_argument("--gpu", action="store_true", help="one GPU per Ray Train worker")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs each Ray Train worker reserves")
    p.add_argument("--export", default=None, help="path of the final weights (default OUT/model.safetensors)")


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        out_dir=a.out, model=a.model, vae_steps=a.vae_steps, dit_steps=a.dit_steps, vae_batch=a.vae_batch,
        dit_batch=a.dit_batch, vae_lr=a.vae_lr, dit_lr=a.dit_lr, warmup_steps=a.warmup_steps, vae_crop=a.vae_crop,
        vae_frames=a.vae_frames, temporal_weight=a.temporal_weight, vae_decoder_only=a.vae_decoder_only,
        latent_clips=a.latent_clips, ema_decay=a.ema_decay,
        timestep_shift=a.timestep_shift, high_noise_share=a.high_noise_share,
        cond_mix=parse_cond_mix(a.cond_mix) if a.cond_mix else None,
        checkpoint_every=a.checkpoint_every, log_every=a.log_every, seed=a.seed, minutes=a.minutes,
        threads=a.threads, data_workers=a.data_workers, zero_stage=a.zero_stage, resume=a.resume,
        export_path=a.export, init_from=a.init_from)


def run_from_args(a: argparse.Namespace) -> dict:
    """Train as the parsed options say; rank 0's summary."""
    return train(config_from_args(a), num_workers=a.workers, use_gpu=a.gpu, cpus_per_worker=a.cpus_per_worker)


__all__ = ["TrainConfig", "add_train_arguments", "config_from_args", "run_from_args", "train", "train_ray"]
