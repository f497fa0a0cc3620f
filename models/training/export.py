"""Phase 4: the trained model as one safetensors file, `{vae.*, dit.* (EMA)}`, and its sha256
(`export_weights`; with no DiT phase, the DiT of `init_from`), and the DiT of a run stopped early
(`dit_weights_from_checkpoint`)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from models.config import ModelConfig
from models.training.vae import load_final_vae
from models.weights import build_modules, load_weights, save_weights


def dit_weights_from_checkpoint(out_dir: str | Path, model_cfg: ModelConfig,
                                ema: bool = True) -> dict[str, torch.Tensor]:
    """The DiT weights (EMA or raw) of the latest DiT checkpoint, read without DeepSpeed."""
    ckpt = Path(out_dir) / "dit" / "ckpt"
    tag = (ckpt / "latest").read_text().strip()
    state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    if ema:
        return state["ema"]
    return {k: v.float() for k, v in state["module"].items()}


def export_weights(out_dir: str | Path, model_cfg: ModelConfig, path: str | Path,
                   dit_state: dict[str, torch.Tensor] | None = None,
                   metadata: dict[str, str] | None = None) -> tuple[str, ModelConfig]:
    """Write `{vae.*, dit.*}` of a run as one safetensors file; (sha256, the config it fits).

    The DiT is `dit/final.safetensors` (EMA) unless `dit_state` is given (e.g. from
    `dit_weights_from_checkpoint` for a run stopped early). The returned config is `model_cfg`
    with the VAE's latent scale filled in and `weights`/`weights_sha256` pointing at the file.
    """
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
