"""LoRA adapters on a Wan generator, per request: `WanAdapters.activate(request.lora)` before a request
samples, with diffusers' own loader doing the work `WanPipeline.load_lora_weights` + `set_adapters` do.

    adapters = WanAdapters(generator.transformer)
    adapters.activate((LoraAdapter("s3://bucket/loras/style.safetensors", 0.8),))   # loads, sets weights
    adapters.activate(())                                                          # the base model again

A file is read by `WanLoraLoaderMixin.lora_state_dict` (safetensors only: no pickles from a user's
URI), which converts the original Wan / ComfyUI names (`diffusion_model.blocks.0.self_attn.q.lora_down`…)
and musubi-tuner's (`lora_unet_…`) to diffusers' (`transformer.blocks.0.attn1.to_q.lora_A`…); it is
loaded with `load_lora_into_transformer` (PEFT's LoRA layers, unfused) and weighted with the model's
`set_adapters(names, scales)`. Before anything is injected, every key is checked against the model:
a key naming no layer, or a shape the layer does not take, refuses the adapter with one line
(`WanLoraError`), where diffusers would only warn and load the rest. `activate` keeps the adapters
loaded while the next request names the same ones (the rows are grouped by adapter, so a replica loads
each once per group); a request naming others or none unloads them first (`unload_lora`: PEFT's
layers replaced by the original modules), so a request without one renders on the base model exactly.

The adapters go on `transformer` (on Wan 2.2 A14B, the high-noise expert), where diffusers'
`load_lora_weights` puts them by default. Over sequence parallelism (sp > 1) an adapter on `proj_out` is
refused (the gather hook sits on the layer PEFT wraps, so its update would meet the whole sequence).
"""

from __future__ import annotations

import torch

from models.errors import UserError
from models.files import local_model_file
from models.render_types import LoraAdapter
from models.wan.digest import cached_file_sha256s
from models.wan.folder import WanFolderError, check_safetensors

#: the names adapters are loaded under, by position in the request's list
ADAPTER_PREFIX = "reelforge_lora_"


class WanLoraError(UserError):
    """A LoRA adapter that cannot be applied to this model (missing, not safetensors, keys that do not fit)."""


class WanAdapters:
    """The LoRA adapters active on one transformer (see the module's docstring)."""

    def __init__(self, transformer: torch.nn.Module, token_split: bool = False):
        self.transformer = transformer
        self.token_split = token_split  # sp > 1: proj_out's output is gathered, so it takes no adapter
        self.active: tuple[LoraAdapter, ...] = ()
        self.loaded = False  # PEFT layers are in the model (also after a load that failed half-way)

    def activate(self, adapters: tuple[LoraAdapter, ...]) -> None:
        """Make `adapters` (with their scales) the model's active ones; () leaves the base model."""
        adapters = tuple(adapters)
        if adapters == self.active:
            return
        self.clear()
        if not adapters:
            return
        try:
            names = []
            for i, adapter in enumerate(adapters):
                name = f"{ADAPTER_PREFIX}{i}"
                self._load(adapter.uri, name)
                names.append(name)
            self.transformer.set_adapters(names, [float(a.scale) for a in adapters])
        except Exception:
            self.clear()
            raise
        self.active = adapters

    def clear(self) -> None:
        """Unload every adapter: the model's own modules back in place."""
        if self.loaded:
            self.transformer.unload_lora()
        self.loaded, self.active = False, ()

    def _load(self, uri: str, name: str) -> None:
        from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

        state_dict, metadata = read_adapter(uri)
        # a text-to-video adapter on an image-to-video model: zeros for its image layers, as diffusers does
        state_dict = WanLoraLoaderMixin._maybe_expand_t2v_lora_for_i2v(self.transformer, state_dict)
        check_adapter_fits(state_dict, self.transformer, uri)
        if self.token_split and any(k.removeprefix("transformer.").startswith("proj_out.") for k in state_dict):
            raise WanLoraError(f"lora: {uri} adapts proj_out, whose tokens sequence parallelism gathers; render "
                               f"this row without --sp")
        self.loaded = True
        WanLoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=self.transformer, adapter_name=name,
                                                      metadata=metadata)


def read_adapter(uri: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict in diffusers' names, diffusers' LoRA metadata) of the safetensors file at `uri`."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    path = adapter_file(uri)
    try:
        check_safetensors(path, f"lora: {uri}")
    except WanFolderError as e:
        raise WanLoraError(f"{e}; a LoRA adapter is one safetensors file") from None
    try:
        state_dict, metadata = WanLoraLoaderMixin.lora_state_dict(path, use_safetensors=True,
                                                                  return_lora_metadata=True)
    except Exception as e:  # a converter that meets keys it does not know
        raise WanLoraError(f"lora: {uri} is not a Wan LoRA adapter diffusers can read "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return state_dict, metadata


def check_adapter_fits(state_dict: dict[str, torch.Tensor], transformer: torch.nn.Module, uri: str) -> None:
    """Raise WanLoraError (one line) unless every key of the (converted) adapter names a linear layer of
    `transformer` and fits its shape: lora_A (rank, in_features), lora_B (out_features, rank)."""
    if not state_dict:
        raise WanLoraError(f"lora: {uri} holds no tensors")
    unmatched, misfit = [], []
    for key, tensor in state_dict.items():
        name = key.removeprefix("transformer.")
        layer_name, part = _split_key(name)
        try:
            layer = transformer.get_submodule(layer_name) if part else None
        except AttributeError:
            layer = None
        if hasattr(layer, "get_base_layer"):  # already wrapped by an adapter loaded before this one
            layer = layer.get_base_layer()
        if not isinstance(layer, torch.nn.Linear):
            unmatched.append(name)
            continue
        expected = {"lora_A.weight": (tensor.shape[0], layer.in_features),
                    "lora_B.weight": (layer.out_features, tensor.shape[-1]),
                    "lora_B.bias": (layer.out_features,)}[part]
        if tuple(tensor.shape) != expected:
            misfit.append(f"{name} is {tuple(tensor.shape)}, the layer takes {expected}")
    if len(unmatched) == len(state_dict):
        raise WanLoraError(f"lora: {uri}: none of its {len(state_dict)} keys names a layer of this model "
                           f"(e.g. {unmatched[0]}); it is not an adapter for this checkpoint")
    if unmatched:
        raise WanLoraError(f"lora: {uri}: {len(unmatched)} of its {len(state_dict)} keys name no layer of this "
                           f"model (e.g. {unmatched[0]}); it is for another checkpoint")
    if misfit:
        raise WanLoraError(f"lora: {uri}: {len(misfit)} of its {len(state_dict)} tensors do not fit this model "
                           f"({misfit[0]}); it is for another checkpoint size")


def _split_key(name: str) -> tuple[str, str]:
    """("blocks.0.attn1.to_q", "lora_A.weight") of a diffusers LoRA key; ("", "") for any other key."""
    for part in ("lora_A.weight", "lora_B.weight", "lora_B.bias"):
        if name.endswith("." + part):
            return name[:-len(part) - 1], part
    return name, ""


def adapter_file(uri: str) -> str:
    """A local path of the adapter at `uri` (cached once per machine for a remote URI)."""
    try:
        return local_model_file(uri, "lora file")
    except FileNotFoundError as e:
        raise WanLoraError(f"lora: {e}") from None


def adapter_records(adapters: tuple[LoraAdapter, ...]) -> list[dict]:
    """What a clip's metadata records of its adapters: [{uri, scale, sha256 of the file}]."""
    paths = [adapter_file(a.uri) for a in adapters]
    digests = cached_file_sha256s(paths)
    return [{"uri": a.uri, "scale": float(a.scale), "sha256": digests[p]} for a, p in zip(adapters, paths)]
