"""Weights: safetensors files on any fsspec URI, identified by the sha256 of their bytes.

A model's weights are one safetensors file with the keys of `build_modules(config)`: `vae.*` and
`dit.*` (the text encoder is named by the config, not stored here). Every clip records the
sha256 that `load_modules` reports, so a clip can be traced to the exact weights that made it:

* `weights` set: the sha256 of the file's bytes, checked against `weights_sha256` when the config
  gives one (a mismatch is an error, never a warning);
* `weights` null: the model is initialised deterministically from `init_seed` (CPU RNG, so the same
  on every machine with the same torch), and the sha256 is that of its safetensors serialisation.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.config import ModelConfig
from models.dit import VideoDiT
from models.errors import UserError
from models.store import store_fs, store_open
from models.vae import VideoAutoencoder


class WeightsError(UserError):
    """Weights cannot be read, do not match their expected sha256, or do not fit the model."""

    show_type = True


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serialize(state_dict: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors bytes of a state dict (tensors moved to CPU, made contiguous)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    return st_save(tensors, metadata=metadata)


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 of `safetensors.torch.save(state_dict)`: the identity of weights not read from a file."""
    return sha256_bytes(serialize(state_dict))


def save_weights(state_dict: dict[str, torch.Tensor] | nn.Module, uri: str,
                 metadata: dict[str, str] | None = None) -> str:
    """Write safetensors to a path or fsspec URI (atomically for local files); returns its sha256."""
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    data = serialize(state_dict, metadata)
    fs, path = store_fs(uri)
    if _is_local(fs):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    else:
        with fs.open(path, "wb") as f:
            f.write(data)
    return sha256_bytes(data)


def load_weights(uri: str, expected_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict on CPU, sha256 of the file's bytes) from a path or fsspec URI.

    Raises WeightsError when the file is missing or unreadable, or its sha256 is not the expected one.
    """
    try:
        with store_open(uri, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise WeightsError(f"weights not found: {uri}") from None
    sha = sha256_bytes(data)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise WeightsError(f"weights {uri} have sha256 {sha}, expected {expected_sha256.lower()} "
                           f"(the file changed, is truncated, or the config names the wrong file)")
    try:
        state_dict = st_load(data)
    except Exception as e:
        raise WeightsError(f"weights {uri} are not a safetensors file: {e}") from None
    return state_dict, sha


def build_modules(config: ModelConfig) -> nn.ModuleDict:
    """The model's trainable parts, with the key layout of its weights file: {"vae", "dit"}."""
    return nn.ModuleDict({"vae": VideoAutoencoder(config.vae), "dit": VideoDiT(config.dit)})


def init_modules(config: ModelConfig) -> nn.ModuleDict:
    """`build_modules` under a fixed seed (`init_seed`), without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        return build_modules(config)


def load_modules(config: ModelConfig) -> tuple[nn.ModuleDict, str]:
    """(modules on CPU in eval mode, weights sha256) for a config: from its file, or initialised."""
    modules = init_modules(config)
    if config.weights is None:
        return modules.eval(), state_dict_sha256(modules.state_dict())
    state_dict, sha = load_weights(config.weights, config.weights_sha256)
    missing, unexpected = _key_diff(modules.state_dict(), state_dict)
    if missing or unexpected:
        raise WeightsError(f"weights {config.weights} do not fit config {config.name!r}: missing "
                           f"{_few(missing)}, unexpected {_few(unexpected)}")
    try:
        modules.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # shape mismatches
        raise WeightsError(f"weights {config.weights} do not fit config {config.name!r}: "
                           f"{str(e).splitlines()[-1].strip()}") from None
    return modules.eval(), sha


def weights_sha256(config: ModelConfig) -> str:
    """The sha256 a loaded model would report, as cheaply as possible (no model for a file with
    a declared sha256: that is checked when the model is loaded)."""
    if config.weights is None:
        return state_dict_sha256(init_modules(config).state_dict())
    if config.weights_sha256:
        return config.weights_sha256.lower()
    try:
        with store_open(config.weights, "rb") as f:
            return sha256_bytes(f.read())
    except FileNotFoundError:
        raise WeightsError(f"weights not found: {config.weights}") from None


def _key_diff(expected: dict, got: dict) -> tuple[list[str], list[str]]:
    return sorted(set(expected) - set(got)), sorted(set(got) - set(expected))


def _few(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _is_local(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocols or "local" in protocols
