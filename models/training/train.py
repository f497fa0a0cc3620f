"""Training: the video autoencoder, then the diffusion transformer, on DeepSpeed engines.

Pure torch + DeepSpeed (no Ray): `pipeline/train.py` runs `train_model` in each Ray Train worker,
or in one plain process. The data comes from a `models.training.data.ClipSource` (the shapes
world in practice: `models.shapes.source`).

Phases, each resumable from its own DeepSpeed checkpoints under `out_dir` (the loop, the
checkpoints and the logs: `models.training.engine`):

1. VAE (`vae/`, `models.training.vae`): reconstruction of random crops; then the latent scale.
2. Latent cache and caption states (`models.training.dit`): encoded once, kept in `out_dir`.
3. DiT (`dit/`, `models.training.dit`): rectified flow with frame conditioning and caption
   dropout; an EMA of the weights.
4. Export (`models.training.export`): `{vae.*, dit.* (EMA)}` as one safetensors file and its
   sha256 (with no DiT phase, the DiT of `init_from`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from models.training.config import TrainConfig
from models.training.data import ClipSource
from models.training.dit import train_dit
from models.training.engine import Run, init_training_process, initial_modules
from models.training.export import export_weights
from models.training.vae import adopt_vae, train_vae


def train_model(cfg: TrainConfig, source: ClipSource, report: Callable[[dict], None] | None = None) -> dict:
    """VAE → caches → DiT → export, resumable; the entry point of every worker (and of a lone
    process). Returns a summary (rank 0's paths and figures; `finished` False when the time ran out)."""
    cfg.check_init_from()  # before any process group or file: a wrong --init-from fails at once
    rank, world, device = init_training_process()
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
