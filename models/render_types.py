"""What both sides of the seam speak: a clip to render, the frames made, the model's grid.

`pipeline/` builds `RenderRequest`s and calls `VideoGenerator.generate`; `GridLimits` says which
requests a model accepts and `ModelInfo` what it is. `pipeline/` imports these through
`models.interface`, the seam; models/ imports them from here. Nothing here imports torch or Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

#: The generation modes a request can stand for (a manifest row's `mode`): text→video, a still,
#: image→video, extension, interpolation, remix, storyboard. `GridLimits.modes` says which a model renders.
MODES = ("t2v", "i2v", "extend", "interpolate", "remix", "storyboard", "image")
#: The precisions a model may be loaded in (`load_generator(dtype=...)`, `reel render --dtype`), by torch's names.
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelInfo:
    """What a clip's metadata records about the model that made it."""

    name: str
    version: str
    weights_sha256: str


@dataclass(frozen=True)
class GridLimits:
    """The sizes, lengths and sampling settings a model accepts.

    Width and height must be multiples of `size_multiple` (the VAE's spatial factor times the
    patch size); the frame count `frame_offset` plus a multiple of `frame_multiple` (the VAE's
    temporal factor): multiples of it for the default model, 4k+1 for a causal VAE that keeps the
    first frame on its own (Wan), from `min_frames` up to `max_frames`.
    A request longer than `window_frames` is sampled in windows of that length, each holding the
    last `context_frames` of the one before fixed (frame conditioning), up to `max_frames`.
    `modes`: the generation modes the model renders (`MODES`; a text-to-video checkpoint takes no
    given frames, so no i2v, extension, interpolation or storyboard), checked before a row renders.
    `cond_at_ends`: given frames only as a request's first frame (and its last, where the model
    interpolates): an image-to-video Wan checkpoint; the modes then carry one frame across a seam.
    """

    size_multiple: int
    min_size: int
    max_size: int
    max_pixels: int
    frame_multiple: int
    max_frames: int
    window_frames: int
    context_frames: int
    min_fps: int
    max_fps: int
    max_steps: int
    default_width: int
    default_height: int
    default_fps: int
    default_seconds: float
    default_steps: int
    default_guidance: float
    frame_offset: int = 0
    has_guidance_2: bool = False  # requests may set `guidance_2` (a model with a low-noise expert)
    #: The largest guidance scale accepted: classifier-free guidance far above the tens pushes the
    #: prediction out of the range the sampler and the VAE handle (1e308 overflows to inf and a
    #: black clip), and no checkpoint here is tuned past ~10.
    max_guidance: float = 30.0
    modes: tuple[str, ...] = MODES
    takes_lora: bool = False  # requests may name LoRA adapters (`RenderRequest.lora`: diffusers Wan folders)
    cond_at_ends: bool = False  # given frames only as a request's first (and last) frame (Wan image checkpoints)

    def check_mode(self, mode: str) -> None:
        """Raise ValueError (one line, naming the modes the model renders) for a mode it cannot render."""
        if mode not in self.modes:
            raise ValueError(f"mode {mode} is not one this model renders; it renders {', '.join(self.modes)}")

    @property
    def min_frames(self) -> int:
        """The shortest frame count allowed (one frame step for the default model; 1 for Wan)."""
        m, o = self.frame_multiple, self.frame_offset
        return o + m * -(-(1 - o) // m)

    def frames_for(self, seconds: float, fps: int) -> int:
        """The allowed frame count nearest to `seconds` at `fps`, at least `min_frames`; not capped at
        `max_frames` (a caller says how far over the maximum a request is)."""
        m, o = self.frame_multiple, self.frame_offset
        wanted = min(seconds * max(fps, 0), 2.0**53)  # huge lengths stay huge, and an int (no inf)
        return max(self.min_frames, o + int(round((wanted - o) / m)) * m)

    def nearest_frames(self, n: int) -> int:
        """The allowed frame count nearest to `n`, in `min_frames`..`max_frames`."""
        m, o = self.frame_multiple, self.frame_offset
        return min(max(o + int(round((n - o) / m)) * m, self.min_frames), self.max_frames)

    def frames_at_least(self, n: int) -> int:
        """The shortest allowed frame count holding `n` frames (at least `min_frames`; not capped at
        `max_frames`): the length a clip is padded to before it is encoded, or a context rounded to
        whole latent frames."""
        m, o = self.frame_multiple, self.frame_offset
        return max(self.min_frames, o + m * -(-(n - o) // m))

    def frames_allowed(self) -> str:
        """The allowed frame counts in words, as `check` names them."""
        if not self.frame_offset:
            return f"multiples of {self.frame_multiple} up to {self.max_frames}"
        return f"{self.frame_offset} + a multiple of {self.frame_multiple}, from {self.min_frames} to {self.max_frames}"

    def nearest_size(self, v: int) -> int:
        """The allowed width/height nearest to `v`."""
        m = self.size_multiple
        return min(max(int(round(v / m)) * m, self.min_size), self.max_size)

    def fit_size(self, width: int, height: int) -> tuple[int, int]:
        """The allowed size nearest to width×height with its aspect ratio kept as far as the grid
        allows: scaled down to fit `max_size` and `max_pixels`, each side snapped to the grid."""
        scale = min(1.0, self.max_size / max(width, height), (self.max_pixels / (width * height)) ** 0.5)
        w, h = self.nearest_size(round(width * scale)), self.nearest_size(round(height * scale))
        while w * h > self.max_pixels:  # rounding up can overshoot the pixel budget by a step
            if w >= h:
                w -= self.size_multiple
            else:
                h -= self.size_multiple
        return w, h

    def check(self, request: RenderRequest) -> None:
        """Raise ValueError (one line, naming the nearest allowed value) for a request off the grid."""
        r, m = request, self.size_multiple
        for name, v in (("width", r.width), ("height", r.height)):
            if v % m or not self.min_size <= v <= self.max_size:
                raise ValueError(f"{name}={v} is not on the model's grid; nearest allowed is {self.nearest_size(v)} "
                                 f"(multiples of {m} from {self.min_size} to {self.max_size})")
        if r.width * r.height > self.max_pixels:
            raise ValueError(f"{r.width}x{r.height} is {r.width * r.height} pixels; "
                             f"the model's maximum is {self.max_pixels}")
        if (r.frames - self.frame_offset) % self.frame_multiple or not self.min_frames <= r.frames <= self.max_frames:
            raise ValueError(f"frames={r.frames} is not on the model's grid; nearest allowed is "
                             f"{self.nearest_frames(r.frames)} ({self.frames_allowed()})")
        if not self.min_fps <= r.fps <= self.max_fps:
            raise ValueError(f"fps={r.fps} is outside {self.min_fps}..{self.max_fps}")
        if not 1 <= r.steps <= self.max_steps:
            raise ValueError(f"steps={r.steps} is outside 1..{self.max_steps}")
        if not 0 <= r.guidance <= self.max_guidance:  # NaN fails too
            raise ValueError(f"guidance={r.guidance:g} is outside 0..{self.max_guidance:g}")
        if r.guidance_2 is not None and not self.has_guidance_2:
            raise ValueError("guidance_2 is for a model with a low-noise expert (Wan 2.2 A14B); this one has none")
        if r.guidance_2 is not None and not 0 <= r.guidance_2 <= self.max_guidance:
            raise ValueError(f"guidance_2={r.guidance_2:g} is outside 0..{self.max_guidance:g}")
        if r.cond_frames is not None or r.cond_index:
            frames = r.cond_frames
            if (frames is None or frames.ndim != 4 or frames.shape[1:] != (r.height, r.width, 3)
                    or frames.dtype != np.uint8):
                shape = None if frames is None else (frames.shape, str(frames.dtype))
                raise ValueError(f"cond_frames must be uint8 K x {r.height} x {r.width} x 3, got {shape}")
            if len(r.cond_index) != frames.shape[0]:
                raise ValueError(f"cond_index has {len(r.cond_index)} positions for {frames.shape[0]} cond_frames")
            bad = [i for i in r.cond_index if not 0 <= i < r.frames]
            if bad or len(set(r.cond_index)) != len(r.cond_index):
                raise ValueError(f"cond_index {tuple(r.cond_index)} must be distinct frame positions in "
                                 f"0..{r.frames - 1}")
        if not 0 <= r.strength <= 1:
            raise ValueError(f"strength={r.strength} must be in [0, 1]")
        if r.lora and not self.takes_lora:
            raise ValueError("lora: this model takes no LoRA adapters (they are for diffusers Wan folders)")
        if r.init_frames is not None:
            frames = r.init_frames
            if frames.shape != (r.frames, r.height, r.width, 3) or frames.dtype != np.uint8:
                raise ValueError(f"init_frames must be uint8 {r.frames} x {r.height} x {r.width} x 3, "
                                 f"got {frames.shape} {frames.dtype}")
        elif r.strength < 1:
            raise ValueError("strength < 1 needs init_frames (the video to remix)")


#: The step cache's threshold when one is asked for without a value (`reel render --step-cache`): the
#: largest that kept the default model's adherence within 0.02 of the uncached render (docs/SCALING.md).
DEFAULT_STEP_CACHE = 0.3


@dataclass(frozen=True)
class RenderRequest:
    """One clip to sample. `frames` is the pixel-frame count (on the model's grid: `GridLimits`).

    `cond_frames` (uint8 K×H×W×3) with `cond_index` (K pixel-frame positions) give frames that are
    known (image→video, extension, interpolation); they are encoded, held fixed through frame
    conditioning, and returned as given.

    `init_frames` (uint8 T×H×W×3) with `strength` < 1 remix a video (SDEdit): sampling starts from
    the video's latents noised to t = strength instead of from pure noise, so 0 returns the video
    and 1 ignores it.

    `guidance_2`: the guidance of a two-expert model's low-noise expert (Wan 2.2 A14B); None:
    `guidance`. Only models whose `GridLimits.has_guidance_2` take it.

    `lora`: LoRA adapters applied to the model for this request (`LoraAdapter`s: a file's URI and its
    scale); only models whose `GridLimits.takes_lora` take them.
    `step_cache`: the first-block cache's threshold (`models/step_cache.py`): steps whose first block's
    residual changed by less than it (relative L1) reuse the later blocks' residual; None: every step
    runs every block.
    """

    caption: str
    width: int
    height: int
    frames: int
    fps: int
    seed: int
    steps: int
    guidance: float
    negative_caption: str = ""
    cond_frames: np.ndarray | None = field(default=None, compare=False)
    cond_index: tuple[int, ...] = ()
    init_frames: np.ndarray | None = field(default=None, compare=False)
    strength: float = 1.0
    guidance_2: float | None = None
    lora: tuple[LoraAdapter, ...] = ()
    step_cache: float | None = None


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter for a request: the URI of its safetensors file (a local path or any fsspec URI) and
    the scale its update is applied at (diffusers' `set_adapters` weight)."""

    uri: str
    scale: float = 1.0


@dataclass
class RenderOutput:
    """Frames of one clip (uint8, T×H×W×3) and seconds spent per stage (text, sample, decode).

    `steps_computed`: with a step cache, the sampling steps that ran every block (summed over a long
    clip's windows); None without one. `latents`: what `generate_latents` gives instead of frames (a CPU
    tensor its `decode_latents` turns into them; `models/handoff.py`); `frames` is None then.
    """

    frames: np.ndarray | None
    timings: dict[str, float]
    steps_computed: int | None = None
    latents: Any = None


@runtime_checkable
class VideoGenerator(Protocol):
    info: ModelInfo
    limits: GridLimits
    precision: str  # the dtype it computes in ("float32", "bfloat16", …): what a clip's metadata records

    def generate(self, requests: Sequence[RenderRequest], text_states: dict | None = None) -> list[RenderOutput]:
        """Sample each request. The same request gives the same frames on the same machine,
        whatever else is in the batch. `text_states`: its captions' states, handed over by another process's
        `encode_captions` (a disaggregated render, `models/handoff.py`), instead of this one's text encoder."""
        ...


class DisaggregatedGenerator(VideoGenerator, Protocol):
    """A `VideoGenerator` whose stages can run apart (`models/handoff.py`): loaded with some of its `parts`, it
    encodes captions, samples latents, or decodes them; the pieces give `generate`'s frames exactly."""

    def encode_captions(self, captions: Sequence[str]) -> dict:
        """{caption: its text states, CPU tensors}, each caption encoded on its own."""
        ...

    def hands_over(self, request: RenderRequest) -> bool:
        """Whether `generate_latents` takes the request (its frames are its latents' decode alone)."""
        ...

    def generate_latents(self, requests: Sequence[RenderRequest], text_states: dict | None = None
                         ) -> list[RenderOutput]:
        """`generate` up to the decoder: outputs with `latents` (CPU tensors) and no frames."""
        ...

    def decode_latents(self, latents: Any) -> np.ndarray:
        """uint8 frames (T, H, W, 3) of one request's latents from `generate_latents`."""
        ...
