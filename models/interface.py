"""The one seam between the Ray pipeline and the models: what `pipeline/` may use of `models/`.

    info, limits, recaptioner = describe_model("default")      # no weights loaded, no device
    gen = load_generator("default")                             # a VideoGenerator
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

from typing import TYPE_CHECKING

from models.config import (ConfigError, ModelConfig, ParallelConfig, ParallelConfigError, check_layout,
                           load_config)
from models.errors import UserError
from models.files import local_model_dir
from models.render_types import GridLimits, ModelInfo, RenderOutput, RenderRequest, VideoGenerator

if TYPE_CHECKING:
    import torch

__all__ = ["ConfigError", "GridLimits", "ModelConfig", "ModelInfo", "ParallelConfig", "ParallelConfigError",
           "MODEL_RECAPTIONERS", "RenderOutput", "RenderRequest", "UserError", "VideoGenerator", "check_layout", "describe_model",
           "join_render_group", "load_config", "load_generator", "local_model_dir", "model_recaptioner"]


def load_generator(spec: str | ModelConfig = "default", device: torch.device | str | None = None,
                   num_threads: int | None = None, parallel: ParallelConfig | None = None,
                   group=None) -> VideoGenerator:
    """A ready generator for a config (shipped name, .json path, folder or URI, or a ModelConfig).

    `num_threads` sets torch's intra-op threads for this process (CPU rendering).
    `parallel`: this process is one rank of a group running that layout, over `group` (None: the
    default world, joined first with `join_render_group`); every rank gets the same frames back.
    """
    import torch

    from models.generator import DiffusionVideoGenerator, ParallelVideoGenerator

    if num_threads:
        torch.set_num_threads(int(num_threads))
    config = spec if isinstance(spec, ModelConfig) else load_config(spec)
    if parallel is not None:
        return ParallelVideoGenerator(config, parallel, group=group, device=device)
    return DiffusionVideoGenerator(config, device=device)


def describe_model(spec: str | ModelConfig = "default") -> tuple[ModelInfo, GridLimits, str | None]:
    """(info, limits, recaptioner name or None) without loading the text encoder or moving anything
    to a device: what a driver needs to validate a manifest and label outputs."""
    from models.generator import grid_limits
    from models.weights import weights_sha256

    config = spec if isinstance(spec, ModelConfig) else load_config(spec)
    info = ModelInfo(name=config.name, version=config.version, weights_sha256=weights_sha256(config))
    return info, grid_limits(config), config.recaptioner


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
