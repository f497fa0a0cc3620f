"""A Wan text-to-video checkpoint in diffusers' layout, read and checked from its config files alone.

    folder = read_wan_folder(local_model_dir(uri), name=folder_name(uri))   # loads no weights
    folder.variant, wan_grid_limits(folder), wan_model_info(folder)   # the last reads the weights once

The layout is what `WanPipeline.save_pretrained` writes and the released `Wan-AI/*-Diffusers`
repositories hold:

    model_index.json   {"_class_name": "WanPipeline", "vae": ["diffusers", "AutoencoderKLWan"], ...,
                        "boundary_ratio": null | 0.875, "expand_timesteps": false | true}
    transformer/       config.json + diffusion_pytorch_model.safetensors, or its shards + their index
    transformer_2/     Wan 2.2 A14B: the low-noise expert, used below `boundary_ratio`
    vae/               config.json + diffusion_pytorch_model[.safetensors | shards]
    text_encoder/      config.json + model[.safetensors | shards] (UMT5EncoderModel)
    image_encoder/     Wan 2.1 I2V / FLF2V (`WanImageToVideoPipeline`): CLIPVisionModel, + image_processor/
    tokenizer/         the tokenizer's files;  scheduler/  scheduler_config.json
    reelforge.json     optional, reelforge's own: {"default_steps": 4, "default_guidance": 1.0} (the sampling a
                       few-step distill was made for), {"max_frames": 4k+1, "window_frames": 4k+1,
                       "context_frames": 4k} (long clips); diffusers ignores the file

Everything a folder lacks or gets wrong (no model_index.json, another pipeline class, a missing
component, a missing or truncated weight shard) is a `WanFolderError`, one line saying what is wrong
and what to supply, raised before any weight is loaded. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass, field

from models.config import LayerWidths, ParallelConfig, ParallelConfigError, check_layout
from models.errors import UserError
from models.render_types import GridLimits, ModelInfo
from models.store import store_fs
from models.wan.digest import weights_digest

MODEL_INDEX = "model_index.json"
PIPELINE_CLASS = "WanPipeline"
#: the pipelines whose folders render here: text-to-video (and TI2V-5B, whose release is a WanPipeline) and
#: image-to-video (Wan 2.1 I2V / FLF2V with a CLIP image encoder, Wan 2.2 I2V-A14B without one)
PIPELINE_CLASSES = (PIPELINE_CLASS, "WanImageToVideoPipeline")
#: component → the (library, class) names model_index.json may give it; the scheduler may be any
#: diffusers scheduler (`scheduler_class`), the tokenizer any class AutoTokenizer reads.
COMPONENT_CLASSES = {
    "transformer": ("diffusers", ("WanTransformer3DModel",)),
    "transformer_2": ("diffusers", ("WanTransformer3DModel",)),
    "vae": ("diffusers", ("AutoencoderKLWan",)),
    "text_encoder": ("transformers", ("UMT5EncoderModel",)),
    "image_encoder": ("transformers", ("CLIPVisionModel",)),
    "image_processor": ("transformers", ("CLIPImageProcessor", "CLIPImageProcessorFast", "CLIPImageProcessorPil")),
}
REQUIRED = ("vae", "text_encoder", "tokenizer", "scheduler")
#: the weights file of each component (or the stem of its shards' index, `<name>.index.json`)
WEIGHTS_NAME = {"text_encoder": "model.safetensors", "image_encoder": "model.safetensors"}
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class Defaults:
    """What a request that names nothing renders: width, height, frames, fps, steps, guidance."""

    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance: float


#: Per variant: diffusers' `WanPipeline.__call__` defaults (832x480, 81 frames, 50 steps, guidance 5)
#: at Wan 2.1's 16 fps; TI2V-5B at its own 1280x704, 121 frames, 24 fps. `frames` is also the window a
#: long clip is sampled in (the length the variant was trained at).
VARIANT_DEFAULTS = {
    "wan2.1-t2v": Defaults(832, 480, 81, 16, 50, 5.0),
    "wan2.2-a14b": Defaults(832, 480, 81, 16, 50, 5.0),
    "wan2.2-ti2v": Defaults(1280, 704, 121, 24, 50, 5.0),
}
#: up to 1920x1088 (1080p on the 16- and 32-pixel grids); past 1280x720 the VAE decodes in tiles (vae_decode.py)
MAX_SIZE, MAX_PIXELS = 1920, 1920 * 1088
#: reelforge's own settings a folder may carry beside diffusers' files, and the keys it may set: the steps and
#: guidance a row that names none gets (`default_steps`, `default_guidance`: a few-step distill's), the longest
#: clip (`max_frames`, default `DEFAULT_MAX_SECONDS` at the variant's fps), the frames sampled at once
#: (`window_frames`, default the variant's trained length) and the frames each window of a long clip shares
#: with the one before (`context_frames`, default `DEFAULT_CONTEXT_LATENTS` latent frames)
SETTINGS_FILE = "reelforge.json"
SETTINGS_KEYS = ("default_steps", "default_guidance", "max_frames", "window_frames", "context_frames")
DEFAULT_MAX_SECONDS, DEFAULT_CONTEXT_LATENTS = 20, 5
#: what a text-to-video checkpoint renders: text→video, stills (one frame) and remixes (SDEdit); it
#: takes no given frames (image→video, extension, interpolation, storyboards need an I2V checkpoint)
WAN_T2V_MODES = ("t2v", "image", "remix")
#: the modes per image conditioning (`WanFolder.image_conditioning`, docs/MODELS.md's table): TI2V-5B is
#: also text-to-video, so storyboards (shot 1 from text) too; an I2V checkpoint needs a picture to start
#: from; FLF2V's image embedder takes exactly two pictures (first and last), so only interpolation
WAN_IMAGE_MODES = {
    "first-latent": (*WAN_T2V_MODES, "i2v", "extend", "storyboard"),
    "mask": ("i2v", "extend", "interpolate"),
    "clip": ("i2v", "extend"),
    "clip-flf2v": ("interpolate",),
}
MIN_FPS, MAX_FPS, MAX_STEPS = 1, 60, 200


class WanFolderError(UserError):
    """A Wan folder that cannot be used as it stands; the message says what to supply."""


@dataclass(frozen=True)
class WanFolder:
    """What the config files of a checked Wan folder say; `path` is a local folder (a URI's cached
    copy), `source` what the user named (the URI), as messages name it."""

    path: str
    name: str
    transformers: tuple[str, ...]  # "transformer" and/or "transformer_2", those present
    boundary_ratio: float | None
    expand_timesteps: bool
    scheduler_class: str
    vae_config: dict
    transformer_config: dict  # of the first transformer present (both share the shapes)
    weight_files: tuple[str, ...]  # every safetensors file, relative to `path`, sorted
    source: str = ""  # the path or URI given; "" for `path`
    pipeline_class: str = PIPELINE_CLASS
    image_processor: str = ""  # its transformers class, where there are image_encoder/ + image_processor/ (CLIP)
    settings: dict = field(default_factory=dict)  # reelforge.json's keys (`SETTINGS_KEYS`), checked

    @property
    def default_steps(self) -> int | None:
        """reelforge.json's steps (a few-step distill), None: the variant's."""
        return self.settings.get("default_steps")

    @property
    def default_guidance(self) -> float | None:
        guidance = self.settings.get("default_guidance")
        return None if guidance is None else float(guidance)

    def __post_init__(self):
        if not self.source:
            object.__setattr__(self, "source", self.path)

    @property
    def variant(self) -> str:
        """wan2.2-a14b (two experts), wan2.2-ti2v (per-token timesteps) or wan2.1-t2v."""
        if "transformer_2" in self.transformers:
            return "wan2.2-a14b"
        return "wan2.2-ti2v" if self.expand_timesteps else "wan2.1-t2v"

    @property
    def image_conditioning(self) -> str | None:
        """How the folder takes a picture (`models/wan/image_conditioning.py`), None for text-to-video only:
        "first-latent" (TI2V-5B: the picture's latent frame fixed at t = 0), "mask" (Wan 2.2 I2V-A14B: mask
        and picture latents as extra input channels), "clip" (Wan 2.1 I2V: those plus CLIP image states),
        "clip-flf2v" (Wan 2.1 FLF2V: the image embedder's position table holds two pictures)."""
        if self.expand_timesteps:
            return "first-latent"
        if self.pipeline_class == PIPELINE_CLASS:
            return None
        if not self.image_processor:
            return "mask"
        return "clip-flf2v" if self.transformer_config.get("pos_embed_seq_len") else "clip"

    @property
    def spatial_factor(self) -> int:
        return int(self.vae_config.get("scale_factor_spatial") or 8)  # AutoencoderKLWan's defaults

    @property
    def temporal_factor(self) -> int:
        return int(self.vae_config.get("scale_factor_temporal") or 4)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(self.transformer_config.get("patch_size", (1, 2, 2)))


def is_wan_folder(spec) -> bool:
    """Whether `spec` (a path or fsspec URI) is a folder holding model_index.json: a diffusers pipeline."""
    if not isinstance(spec, (str, os.PathLike)):
        return False
    try:
        fs, path = store_fs(str(spec))
        return fs.isfile(posixpath.join(path.rstrip("/"), MODEL_INDEX))
    except (OSError, ValueError, ImportError):
        return False


def folder_name(spec: str) -> str:
    """The last part of a folder's path or URI: the model's name when model_index.json gives none."""
    return posixpath.basename(str(spec).rstrip("/")) or str(spec)


def read_wan_folder(path: str, name: str | None = None, source: str | None = None) -> WanFolder:
    """Read and check a local Wan folder (config files and weight headers; no weights loaded).
    `source`: the path or URI the folder came from, as the messages name it (default `path`)."""
    source = source or path
    where = f"Wan folder {source}"
    index = _read_json(os.path.join(path, MODEL_INDEX), where, path, source)
    if not isinstance(index, dict):
        raise WanFolderError(f"{where}: {MODEL_INDEX} is not a JSON object; supply the pipeline's own {MODEL_INDEX}")
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise WanFolderError(f"{where}: {MODEL_INDEX} is for {cls!r}; only {' and '.join(PIPELINE_CLASSES)} folders "
                             f"are supported (e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers, ...-I2V-14B-480P-Diffusers)")
    present = {}
    for component in (*REQUIRED, "transformer", "transformer_2", "image_encoder", "image_processor"):
        entry = index.get(component)
        if entry is None or entry == [None, None]:
            continue
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(v, str) for v in entry)):
            raise WanFolderError(f"{where}: {MODEL_INDEX} gives {component} as {entry!r}, not [library, class]")
        library, classes = COMPONENT_CLASSES.get(component, (None, ()))
        if classes and (entry[0] != library or entry[1] not in classes):
            raise WanFolderError(f"{where}: {component} is {entry[0]}.{entry[1]}; only {library}.{'/'.join(classes)} "
                                 f"is supported")
        if not os.path.isdir(os.path.join(path, component)):
            raise WanFolderError(f"{where}: {MODEL_INDEX} names a {component} but there is no {component}/ folder; "
                                 f"supply it (from the same release)")
        present[component] = entry[1]
    missing = [c for c in REQUIRED if c not in present]
    if missing:
        raise WanFolderError(f"{where}: no {', '.join(missing)} in {MODEL_INDEX}; supply the complete release "
                             f"(vae, text_encoder, tokenizer, scheduler and a transformer)")
    transformers = tuple(c for c in ("transformer", "transformer_2") if c in present)
    boundary = index.get("boundary_ratio")
    if boundary is not None and (isinstance(boundary, bool) or not isinstance(boundary, (int, float))
                                 or not 0 < boundary <= 1):
        raise WanFolderError(f"{where}: boundary_ratio={boundary!r} in {MODEL_INDEX} must be a number in (0, 1]")
    if not transformers:
        raise WanFolderError(f"{where}: {MODEL_INDEX} names no transformer; supply transformer/ (and transformer_2/ "
                             f"with boundary_ratio for Wan 2.2 A14B)")
    if "transformer_2" in present and boundary is None:
        raise WanFolderError(f"{where}: transformer_2 is there but {MODEL_INDEX} gives no boundary_ratio (where the "
                             f"low-noise expert takes over); set it as the release does (0.875 for Wan 2.2 A14B)")
    if "transformer_2" not in present and boundary is not None:
        raise WanFolderError(f"{where}: {MODEL_INDEX} gives boundary_ratio={boundary} but no transformer_2 (the "
                             f"low-noise expert below it); supply transformer_2/ or set boundary_ratio to null")
    if "transformer" not in present and boundary is not None and boundary < 1:
        raise WanFolderError(f"{where}: no transformer/ for the steps above boundary_ratio={boundary}; supply it")
    if index["scheduler"][0] != "diffusers":
        raise WanFolderError(f"{where}: the scheduler must be a diffusers scheduler, got {index['scheduler']!r}")

    weights = []
    for component in (*transformers, "vae", "text_encoder"):
        weights += [posixpath.join(component, f) for f in component_weight_files(path, component, source)]
    configs = {c: _read_json(os.path.join(path, c, "config.json"), where, path, source)
               for c in (*transformers, "vae")}
    _read_json(os.path.join(path, "scheduler", "scheduler_config.json"), where, path, source)
    _check_image_parts(where, cls, present, configs, bool(index.get("expand_timesteps", False)))
    if "image_encoder" in present:
        weights += [posixpath.join("image_encoder", f) for f in component_weight_files(path, "image_encoder", source)]
    settings = {}
    if os.path.isfile(os.path.join(path, SETTINGS_FILE)):
        settings = _read_json(os.path.join(path, SETTINGS_FILE), where, path, source)
    return check_settings(WanFolder(path=path, name=str(index.get("_name_or_path") or name or folder_name(path)),
                     transformers=transformers, boundary_ratio=None if boundary is None else float(boundary),
                     expand_timesteps=bool(index.get("expand_timesteps", False)),
                     scheduler_class=index["scheduler"][1], vae_config=configs["vae"],
                     transformer_config=configs[transformers[0]], weight_files=tuple(sorted(weights)),
                     source=source, pipeline_class=cls, settings=settings,
                     image_processor=present.get("image_processor", "") if "image_encoder" in present else ""))


def folder_defaults(folder: WanFolder) -> Defaults:
    """The variant's defaults with the folder's own steps and guidance (reelforge.json) over them."""
    d = VARIANT_DEFAULTS[folder.variant]
    return Defaults(d.width, d.height, d.frames, d.fps,
                    d.steps if folder.default_steps is None else folder.default_steps,
                    d.guidance if folder.default_guidance is None else folder.default_guidance)


def check_settings(folder: WanFolder) -> WanFolder:
    """`folder`, once its reelforge.json is a JSON object of known keys with values it can take: steps in
    1..MAX_STEPS, guidance a number;
    `window_frames` 4k+1 from 5 frames; `max_frames` 4k+1 and at least the window; `context_frames` a multiple
    of 4 that leaves each window something new."""
    where, s = f"Wan folder {folder.source}: {SETTINGS_FILE}", folder.settings
    unknown = sorted(set(s) - set(SETTINGS_KEYS)) if isinstance(s, dict) else None
    if unknown is None or unknown:
        got = f"keys {', '.join(unknown)}" if unknown else type(s).__name__
        raise WanFolderError(f"{where} must be a JSON object with keys among {', '.join(SETTINGS_KEYS)}, got {got}")
    for key, v in s.items():
        if key == "default_guidance":
            top = GridLimits.max_guidance  # what a request may ask for: the default must be one
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= top:
                raise WanFolderError(f"{where}: default_guidance={v!r} must be a number in 0..{top:g}")
        elif isinstance(v, bool) or not isinstance(v, int):
            raise WanFolderError(f"{where}: {key}={v!r} must be a whole number"
                                 + (" of frames" if key.endswith("_frames") else ""))
    if "default_steps" in s and not 1 <= s["default_steps"] <= MAX_STEPS:
        raise WanFolderError(f"{where}: default_steps={s['default_steps']} must be in 1..{MAX_STEPS}")
    window, ft = s.get("window_frames", VARIANT_DEFAULTS[folder.variant].frames), folder.temporal_factor
    if (window - 1) % ft or window < 1 + ft:
        raise WanFolderError(f"{where}: window_frames={window} must be 1 + a multiple of {ft}, at least {1 + ft}")
    if "max_frames" in s and ((s["max_frames"] - 1) % ft or s["max_frames"] < window):
        raise WanFolderError(f"{where}: max_frames={s['max_frames']} must be 1 + a multiple of {ft}, at least the "
                             f"window of {window} frames")
    if "context_frames" in s and (s["context_frames"] % ft or not 0 < s["context_frames"] < window - 1):
        raise WanFolderError(f"{where}: context_frames={s['context_frames']} must be a multiple of {ft} in "
                             f"{ft}..{window - 1 - ft} (the frames each window shares with the one before)")
    return folder


def _check_image_parts(where: str, cls: str, present: dict, configs: dict, expand_timesteps: bool) -> None:
    """An image-to-video folder's parts fit together: a CLIP image encoder with its processor exactly when
    the transformer takes image states (`image_dim`), and input channels for the picture's mask and latents
    (2 x z_dim + the VAE's temporal factor, `WanImageToVideoPipeline.prepare_latents`)."""
    transformer = configs.get("transformer") or configs.get("transformer_2")
    if cls == PIPELINE_CLASS or expand_timesteps:
        return
    image_dim = transformer.get("image_dim")
    encoder = "image_encoder" in present and "image_processor" in present
    if image_dim and not encoder:
        raise WanFolderError(f"{where}: the transformer takes CLIP image states (image_dim={image_dim}) but there "
                             f"is no image_encoder/ and image_processor/; supply them from the same release")
    if encoder and not image_dim:
        raise WanFolderError(f"{where}: image_encoder/ is there but the transformer takes no image states "
                             f"(image_dim is null); supply the release's transformer/")
    z, ft = int(configs["vae"].get("z_dim", 16)), int(configs["vae"].get("scale_factor_temporal") or 4)
    channels = transformer.get("in_channels")
    if channels != 2 * z + ft:
        raise WanFolderError(f"{where}: an image-to-video transformer takes {2 * z + ft} input channels (latents, "
                             f"mask, picture latents), this one {channels}; supply the release's transformer/")


def component_weight_files(path: str, component: str, source: str | None = None) -> list[str]:
    """The safetensors files of one component (its shards, or its one file), each checked complete;
    `source` names the folder in messages (default `path`)."""
    folder = os.path.join(path, component)
    name = WEIGHTS_NAME.get(component, DIFFUSERS_WEIGHTS_NAME)
    index = os.path.join(folder, f"{name}.index.json")
    where = f"Wan folder {source or path}: {component}"
    if os.path.isfile(index):
        weight_map = _read_json(index, where, path, source).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise WanFolderError(f"{where}: {name}.index.json has no weight_map; supply the index from the release")
        files = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, name)):
        files = [name]
    else:
        raise WanFolderError(f"{where}/ has no weights: supply {name} or its shards with {name}.index.json "
                             f"(safetensors only)")
    for f in files:
        file = os.path.join(folder, f)
        if not os.path.isfile(file):
            raise WanFolderError(f"{where}: shard {f} is missing; supply every shard its index lists")
        check_safetensors(file, f"{where}/{f}")
    return files


def check_safetensors(file: str, where: str) -> None:
    """Raise WanFolderError unless the file is as long as its safetensors header says (a truncated or
    half-copied download); reads the header only."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            header = json.loads(f.read(n)) if 0 <= n <= size - 8 else None
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise WanFolderError(f"{where} is not a readable safetensors file ({size} bytes); copy it again")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise WanFolderError(f"{where} is {size} bytes but its header describes {expected}: truncated or damaged; "
                             f"copy it again")


def wan_grid_limits(folder: WanFolder) -> GridLimits:
    """The requests a Wan folder accepts: sizes on the VAE x patch grid, 4k+1 frames (the causal
    VAE keeps the first frame on its own), the variant's defaults (steps and guidance: the folder's own
    where reelforge.json gives them), the modes its image conditioning allows, LoRA adapters. A clip
    longer than the window (the variant's frames, or reelforge.json's) is sampled in windows sharing
    `context_frames` (models/wan/windows.py), up to `max_frames` (reelforge.json, default 20 s at the
    variant's fps). A folder that takes a picture takes given frames only at a request's ends
    (`cond_at_ends`), so its extensions carry one frame across a seam (pipeline/stages/modes.py)."""
    image = folder.image_conditioning
    d = folder_defaults(folder)
    size_multiple = folder.spatial_factor * max(folder.patch_size[1:])
    ft = folder.temporal_factor
    return GridLimits(
        size_multiple=size_multiple, min_size=size_multiple, max_size=MAX_SIZE // size_multiple * size_multiple,
        max_pixels=MAX_PIXELS, frame_multiple=ft, frame_offset=1,
        max_frames=folder.settings.get("max_frames", DEFAULT_MAX_SECONDS * d.fps + 1),
        window_frames=folder.settings.get("window_frames", d.frames),
        context_frames=folder.settings.get("context_frames", DEFAULT_CONTEXT_LATENTS * ft),
        min_fps=MIN_FPS, max_fps=MAX_FPS, max_steps=MAX_STEPS,
        default_width=d.width, default_height=d.height, default_fps=d.fps, default_seconds=d.frames / d.fps,
        default_steps=d.steps, default_guidance=d.guidance, has_guidance_2="transformer_2" in folder.transformers,
        modes=WAN_IMAGE_MODES[image] if image else WAN_T2V_MODES, cond_at_ends=bool(image), takes_lora=True,
    )


def wan_layer_widths(folder: WanFolder) -> LayerWidths:
    """The heads, width and FFN width of the folder's transformers (both experts share them), with
    `WanTransformer3DModel`'s defaults for what config.json leaves out."""
    c = folder.transformer_config
    heads = int(c.get("num_attention_heads", 40))
    return LayerWidths(heads, heads * int(c.get("attention_head_dim", 128)), int(c.get("ffn_dim", 13824)))


def check_wan_layout(layout: ParallelConfig, folder: WanFolder, world_size: int | None = None) -> tuple[int, int]:
    """`check_layout` for a Wan folder (tp divides the heads and the FFN; ulysses the heads per tp rank;
    cfg=2 needs the variant's default guidance above 1; a CLIP image-to-video folder on one rank only):
    (ulysses, ring), or ParallelConfigError."""
    if folder.image_processor and layout.world_size > 1:
        raise ParallelConfigError(f"parallel layout sp={layout.sp} x tp={layout.tp} x cfg={layout.cfg}: {folder.name} "
                                  f"takes CLIP image states, which parallel Wan does not split; render it on one rank")
    return check_layout(layout, wan_layer_widths(folder), world_size, folder_defaults(folder).guidance)


def wan_model_info(folder: WanFolder) -> ModelInfo:
    """What a clip's metadata records: the folder's name, version "diffusers", the weights' digest."""
    return ModelInfo(name=folder.name, version="diffusers", weights_sha256=weights_digest(folder.path,
                                                                                         folder.weight_files))


def _read_json(file: str, where: str, root: str = "", source: str = ""):
    """The JSON in `file`; messages name it under `source` (the URI) when it lies under `root` (its copy)."""
    shown = posixpath.join(source, os.path.relpath(file, root)) if root and source and source != root else file
    if not os.path.isfile(file):
        raise WanFolderError(f"{where}: {os.path.basename(file)} is missing ({shown}); supply the release's copy")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, OSError) as e:
        raise WanFolderError(f"{where}: {shown} is not readable JSON ({type(e).__name__}); "
                             f"supply the release's copy") from None
