"""The parts of a checked Wan folder, loaded from the local folder alone (`local_files_only`).

    parts = load_components(folder, torch.device("cpu"), torch.float32)
    parts.tokenizer, parts.text_encoder, parts.vae, parts.experts["transformer"], parts.scheduler

The text encoder (transformers' UMT5EncoderModel), the VAE (diffusers' AutoencoderKLWan, always fp32)
and the scheduler (the diffusers class model_index.json names) come through their own
`from_pretrained`. The transformers are diffusers' `WanTransformer3DModel`, built from their
config.json with their weights read shard by shard: diffusers 0.42's `from_pretrained` needs the
`accelerate` package for any model with `_keep_in_fp32_modules` (every Wan transformer), and
reelforge does not depend on it. The dtypes are the ones `from_pretrained(torch_dtype=dtype)` gives:
built under `dtype` as the default dtype, each weight whose dotted name has a part in
`_keep_in_fp32_modules` in fp32, every other floating weight in `dtype`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import diffusers
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.models.modeling_utils import no_init_weights
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from safetensors.torch import load_file
from transformers import AutoTokenizer, UMT5EncoderModel

from models.wan.folder import WanFolder, WanFolderError, component_weight_files


@dataclass
class WanComponents:
    tokenizer: object
    text_encoder: UMT5EncoderModel
    vae: AutoencoderKLWan
    experts: dict[str, WanTransformer3DModel]  # "transformer" and/or "transformer_2"
    scheduler: SchedulerMixin


def load_components(folder: WanFolder, device: torch.device, dtype: torch.dtype) -> WanComponents:
    """Every part of the folder on `device`, in eval mode, gradients off; text encoder and transformers
    in `dtype`, the VAE in fp32."""
    path = folder.path
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
    text_encoder = UMT5EncoderModel.from_pretrained(os.path.join(path, "text_encoder"), dtype=dtype,
                                                    local_files_only=True)
    vae = AutoencoderKLWan.from_pretrained(os.path.join(path, "vae"), torch_dtype=torch.float32,
                                           local_files_only=True, low_cpu_mem_usage=False)  # small; no accelerate
    experts = {name: load_transformer(folder, name, dtype) for name in folder.transformers}
    for module in (text_encoder, vae, *experts.values()):
        module.to(device).eval().requires_grad_(False)
    return WanComponents(tokenizer, text_encoder, vae, experts, load_scheduler(folder))


def load_transformer(folder: WanFolder, name: str, dtype: torch.dtype) -> WanTransformer3DModel:
    """One of the folder's transformers on the CPU (see the module's docstring for the dtypes)."""
    path = os.path.join(folder.path, name)
    config = WanTransformer3DModel.load_config(path, local_files_only=True)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = WanTransformer3DModel.from_config(config)
    finally:
        torch.set_default_dtype(default)
    keep = model._keep_in_fp32_modules or []
    own = model.state_dict(keep_vars=True)
    for key, tensor in own.items():
        if tensor.is_floating_point() and any(m in key.split(".") for m in keep):
            tensor.data = tensor.data.float()
    loaded: set[str] = set()
    for shard in component_weight_files(folder.path, name):
        weights = load_file(os.path.join(path, shard))
        unexpected = sorted(set(weights) - set(own))
        if unexpected:
            raise WanFolderError(f"Wan folder {folder.path}: {name}/{shard} holds weights its config.json has no "
                                 f"place for ({unexpected[0]}, …); supply the config.json of the same release")
        try:
            model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # a weight of another shape
            first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
            raise WanFolderError(f"Wan folder {folder.path}: {name}/{shard} does not fit its config.json ({first}); "
                                 f"supply the config.json of the same release") from None
        loaded.update(weights)
        del weights
    missing = sorted(set(own) - loaded)
    if missing:
        raise WanFolderError(f"Wan folder {folder.path}: {name}/ has no weights for {missing[0]} (and "
                             f"{len(missing) - 1} more); supply every shard of the release")
    return model.eval()


def load_scheduler(folder: WanFolder) -> SchedulerMixin:
    """The diffusers scheduler model_index.json names, from scheduler/scheduler_config.json."""
    cls = getattr(diffusers, folder.scheduler_class, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise WanFolderError(f"Wan folder {folder.path}: scheduler {folder.scheduler_class!r} is not a diffusers "
                             f"scheduler; supply the release's scheduler/ (UniPCMultistepScheduler)")
    return cls.from_pretrained(os.path.join(folder.path, "scheduler"), local_files_only=True)
