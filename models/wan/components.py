"""The parts of a checked Wan folder, each loaded by its own library's `from_pretrained` from the local
folder alone (`local_files_only`), as `WanPipeline.from_pretrained` loads them.

    parts = load_components(folder, torch.device("cpu"), torch.float32)
    parts.tokenizer, parts.text_encoder, parts.vae, parts.experts["transformer"], parts.scheduler

The text encoder is transformers' `UMT5EncoderModel`, the VAE diffusers' `AutoencoderKLWan` (always
fp32, as diffusers' Wan examples load it), the transformers diffusers' `WanTransformer3DModel` with
`torch_dtype=dtype` (weights in `_keep_in_fp32_modules` stay fp32, diffusers' own rule; loading such
a model needs the `accelerate` package), the scheduler the diffusers class model_index.json names.
Nothing is re-implemented: with the same files the modules hold exactly what the pipeline's hold,
in the same memory layout. That matters on CPU: diffusers' loader leaves each weight where
safetensors put it (addresses 8-byte aligned, not 64), and oneDNN's fp32 matmul rounds differently
for a weight at another alignment (a 2e-7 difference in one `Linear`, measured), so a hand-written
loader that copies the weights into fresh tensors gave frames one level off the pipeline's.

`read_wan_folder` has already checked every shard (present, complete) and refused what cannot load
in one line; a weight file that does not fit its config.json is refused here, also in one line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import diffusers
import torch
import transformers
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

from models.wan.folder import WanFolder, WanFolderError


@dataclass
class WanComponents:
    tokenizer: object | None
    text_encoder: UMT5EncoderModel | None
    vae: AutoencoderKLWan | None
    experts: dict[str, WanTransformer3DModel]  # "transformer" and/or "transformer_2"
    scheduler: SchedulerMixin
    image_encoder: CLIPVisionModel | None = None  # Wan 2.1 I2V / FLF2V: fp32, as diffusers' examples load it
    image_processor: object | None = None  # the folder's CLIPImageProcessor class


def load_components(folder: WanFolder, device: torch.device, dtype: torch.dtype,
                    offload: bool = False, parts: tuple[str, ...] = ("text", "dit", "vae")) -> WanComponents:
    """Every part of the folder, in eval mode, gradients off; text encoder and transformers in `dtype`
    (the transformers' fp32 modules kept), the VAE in fp32. All on `device`; with `offload` the text
    encoder and transformers stay on the CPU (the generator moves each to the device while it runs).

    `parts` (`models/handoff.py`): "text" the tokenizer and text encoder, "dit" the transformers and the image
    encoder, "vae" the VAE; what is not asked for is None (no experts without "dit")."""
    path = folder.path
    tokenizer = text_encoder = vae = None
    if "text" in parts:
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"), local_files_only=True)
        text_encoder = _load(folder, "text_encoder", UMT5EncoderModel, dtype=dtype)
    if "vae" in parts:
        vae = _load(folder, "vae", AutoencoderKLWan, torch_dtype=torch.float32)
    experts = {name: _load(folder, name, WanTransformer3DModel, torch_dtype=dtype)
               for name in (folder.transformers if "dit" in parts else ())}
    image_encoder = image_processor = None
    if folder.image_processor and "dit" in parts:  # the class model_index.json names, as the pipeline loads it
        image_encoder = _load(folder, "image_encoder", CLIPVisionModel, torch_dtype=torch.float32)
        image_processor = getattr(transformers, folder.image_processor).from_pretrained(
            os.path.join(path, "image_processor"), local_files_only=True)
    offloaded = [m for m in (text_encoder, image_encoder, *experts.values()) if m is not None]
    kept = [vae] if vae is not None else []
    for module in (*kept, *offloaded):
        module.eval().requires_grad_(False)
    for module in kept if offload else (*kept, *offloaded):
        module.to(device)
    return WanComponents(tokenizer, text_encoder, vae, experts, load_scheduler(folder), image_encoder, image_processor)


def _load(folder: WanFolder, component: str, cls, **kwargs):
    """`cls.from_pretrained(folder/component, local_files_only=True, **kwargs)`; weights that do not
    fit the component's config.json (another release's) are a WanFolderError in one line."""
    try:
        return cls.from_pretrained(os.path.join(folder.path, component), local_files_only=True, **kwargs)
    except (ValueError, RuntimeError, OSError) as e:
        reason = " ".join(str(e).split())[:200]
        raise WanFolderError(f"Wan folder {folder.source}: {component}/ does not load ({reason}); "
                             f"supply its config.json and weights from the same release") from None


def load_scheduler(folder: WanFolder) -> SchedulerMixin:
    """The diffusers scheduler model_index.json names, from scheduler/scheduler_config.json."""
    cls = getattr(diffusers, folder.scheduler_class, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise WanFolderError(f"Wan folder {folder.source}: scheduler {folder.scheduler_class!r} is not a diffusers "
                             f"scheduler; supply the release's scheduler/ (UniPCMultistepScheduler)")
    return cls.from_pretrained(os.path.join(folder.path, "scheduler"), local_files_only=True)
