"""The one seam between the Ray pipeline and the models: what `pipeline/` may use of `models/`.

    info, limits, recaptioner = describe_model("default")      # no weights loaded, no device
    gen = load_generator("default")                             # a VideoGenerator
    gen = load_generator("/models/Wan2.1-T2V-1.3B-Diffusers")   # a diffusers Wan folder (models/wan/)
    [out] = gen.generate([RenderRequest(caption=..., width=64, height=64, frames=16, fps=8,
                                        seed=1, steps=20, guidance=4.5)])

`pipeline/` builds `RenderRequest`s and calls `VideoGenerator.generate`; everything it knows about
a model comes through this module: what the model is (`ModelInfo`), which requests it accepts
(`GridLimits`), its config and parallel layout (checked before anything starts), a model's own
caption style (`model_recaptioner`), and local copies of model folders. Training and evaluation
(`pipeline/train.py`, `pipeline/evaluate.py`) may also import `models.training` and `models.shapes`.

Importing this module loads neither torch nor Ray: the loaders import the heavy modules when
called, so a driver can validate a manifest without them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from models.config import ConfigError, ModelConfig, ParallelConfig, ParallelConfigError, check_layout, load_config
from models.errors import UserError
from models.files import file_version, local_model_dir
from models.handoff import PARTS, from_bytes, to_bytes
from models.render_types import (
    DEFAULT_STEP_CACHE,
    DTYPES,
    MODES,
    DisaggregatedGenerator,
    GridLimits,
    LoraAdapter,
    ModelInfo,
    RenderOutput,
    RenderRequest,
    VideoGenerator,
)
from models.store import store_options
from models.wan.folder import (
    WanFolder,
    check_wan_layout,
    folder_name,
    is_wan_folder,
    read_wan_folder,
    wan_grid_limits,
    wan_model_info,
)

if TYPE_CHECKING:
    import torch

__all__ = ["ConfigError", "GridLimits", "ModelConfig", "ModelInfo", "ParallelConfig", "ParallelConfigError",
           "DEFAULT_STEP_CACHE", "DTYPES", "DisaggregatedGenerator", "LoraAdapter", "PARTS", "MODEL_RECAPTIONERS",
           "MODES", "RenderOutput", "RenderRequest", "UserError", "VideoGenerator", "check_layout",
           "check_load_options", "check_model_layout", "describe_model", "file_version", "from_bytes",
           "is_wan_folder", "join_render_group", "load_config", "load_generator", "local_model_dir",
           "lora_records", "model_layout", "model_recaptioner", "store_options", "to_bytes"]


def load_generator(spec: str | ModelConfig = "default", device: torch.device | str | None = None,
                   num_threads: int | None = None, parallel: ParallelConfig | None = None,
                   group=None, dtype: str | None = None, offload: bool = False,
                   compile: bool = False, parts: tuple[str, ...] | None = None) -> VideoGenerator:
    """A ready generator for a config (shipped name, .json path, folder or URI, or a ModelConfig),
    or for a folder / URI holding a diffusers Wan pipeline (model_index.json: `models/wan/`).

    `num_threads` sets torch's intra-op threads for this process (CPU rendering).
    `parallel`: this process is one rank of a group running that layout, over `group` (None: the
    default world, joined first with `join_render_group`); every rank gets the same frames back.
    A Wan folder takes the same layouts (`models/wan/parallel.py`); it is loaded with HF_HUB_OFFLINE=1.
    `dtype` and `offload`: the precision and CPU offload (`check_load_options` says what each model
    takes; None: bf16 on GPUs, fp32 on CPUs). The generator's `precision` names the one it runs in.
    `compile`: the DiT's blocks go through `torch.compile` (compiled at the first render of each shape;
    the frames equal the eager ones to float rounding).
    `parts`: what to load for a render whose stages run apart (`models/handoff.py`): "text" to encode
    captions, "dit" + "vae" to sample latents from states handed over, "vae" to decode them; None: all.
    """
    import torch

    check_load_options(spec, dtype, offload)
    if num_threads:
        torch.set_num_threads(int(num_threads))
    if is_wan_folder(spec):
        folder = _wan_folder(spec)
        os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers and diffusers load: nothing is downloaded

        from models.wan.generator import WanVideoGenerator

        gen = WanVideoGenerator(folder, device=device, parallel=parallel, group=group, dtype=dtype, offload=offload,
                                parts=parts)
    else:
        from models.generator import DiffusionVideoGenerator, ParallelVideoGenerator

        config = spec if isinstance(spec, ModelConfig) else load_config(spec)
        if parallel is not None:
            gen = ParallelVideoGenerator(config, parallel, group=group, device=device, dtype=dtype, parts=parts)
        else:
            gen = DiffusionVideoGenerator(config, device=device, dtype=dtype, parts=parts)
    if compile:
        gen.compile_blocks()
    return gen


def check_load_options(spec: str | ModelConfig, dtype: str | None = None, offload: bool = False) -> None:
    """Raise ConfigError (one line) for a precision or offload the model cannot take, before anything loads.

    A Wan folder takes float32, bfloat16 and float16 (its text encoder and transformers; the VAE stays
    fp32) and `offload` (the text encoder and experts on the CPU between uses). The default model's
    weights are fp32 and it autocasts to bfloat16 on GPUs: it takes float32 (no autocast) and
    bfloat16 (autocast, also on CPUs), and no offload (it fits any device whole).
    """
    wan = is_wan_folder(spec)
    allowed = DTYPES if wan else ("float32", "bfloat16")
    if dtype is not None and dtype not in allowed:
        kind = "a Wan folder" if wan else "this model"
        raise ConfigError(f"dtype {dtype} is not one {kind} renders in ({', '.join(allowed)})")
    if offload and not wan:
        raise ConfigError("offload is for diffusers Wan folders (their text encoder and experts); this model "
                          "fits its device whole")


def describe_model(spec: str | ModelConfig = "default") -> tuple[ModelInfo, GridLimits, str | None]:
    """(info, limits, recaptioner name or None) without loading the text encoder or moving anything
    to a device: what a driver needs to validate a manifest and label outputs. For a Wan folder:
    its config files and the digest of its weights (read once per machine, then cached)."""
    if is_wan_folder(spec):
        folder = _wan_folder(spec)
        return wan_model_info(folder), wan_grid_limits(folder), "verbatim"  # its pipeline's own prompt

    from models.generator import grid_limits
    from models.weights import weights_sha256

    config = spec if isinstance(spec, ModelConfig) else load_config(spec)
    info = ModelInfo(name=config.name, version=config.version, weights_sha256=weights_sha256(config))
    return info, grid_limits(config), config.recaptioner


def model_layout(spec: str | ModelConfig, sp: int | None = None, tp: int | None = None,
                 cfg: int | None = None) -> ParallelConfig:
    """The layout of a render replica: the model config's `parallel` section (a Wan folder: one rank),
    with each degree that is given overriding it; ParallelConfigError (one line) if it cannot work."""
    base = ParallelConfig() if is_wan_folder(spec) else _config(spec).parallel
    layout = ParallelConfig(sp=base.sp if sp is None else sp, tp=base.tp if tp is None else tp,
                            cfg=base.cfg if cfg is None else cfg, ulysses=base.ulysses)
    check_model_layout(spec, layout)
    return layout


def check_model_layout(spec: str | ModelConfig, layout: ParallelConfig) -> None:
    """Raise ParallelConfigError (one line) for a layout the model (a config or a Wan folder) cannot
    take: degrees that do not divide its heads and widths, cfg=2 without guidance. Loads no weights."""
    if is_wan_folder(spec):
        check_wan_layout(layout, _wan_folder(spec))
    else:
        config = _config(spec)
        check_layout(layout, config.dit, guidance=config.sampler.guidance)


def _config(spec: str | ModelConfig) -> ModelConfig:
    return spec if isinstance(spec, ModelConfig) else load_config(spec)


def _wan_folder(spec: str) -> WanFolder:
    """The checked Wan folder at a path or URI (a remote folder is copied once to the local cache)."""
    return read_wan_folder(local_model_dir(str(spec)), name=folder_name(str(spec)), source=str(spec))


def lora_records(adapters: tuple[LoraAdapter, ...]) -> list[dict]:
    """What a clip's metadata records of its LoRA adapters: [{uri, scale, sha256 of the file}] (a remote
    file is read from the local cache the generator filled; each file is hashed once per machine)."""
    from models.wan.lora import adapter_records

    return adapter_records(tuple(adapters))


def join_render_group(rank: int, world_size: int, master_addr: str = "127.0.0.1", master_port: int = 29500,
                      backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Join this process to a render replica's group: gloo on CPUs, NCCL on GPUs (rank 0 at
    `master_addr:master_port`); then `load_generator(..., parallel=...)` in every rank."""
    from models.parallel import init_distributed

    init_distributed(rank, world_size, master_addr, master_port, backend, timeout_s)


#: Caption styles that models trained on their own canonical captions register, by the name their
#: config's `recaptioner` gives: "module:class", loaded when asked for.
MODEL_RECAPTIONERS = {"shapes": "models.shapes.recaptioner:ShapesRecaptioner"}


def model_recaptioner(name: str):
    """A new instance of the recaptioner a model registered under `name` (KeyError if none)."""
    import importlib

    module, _, cls = MODEL_RECAPTIONERS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()
