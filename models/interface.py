"""The one seam between the Ray pipeline and the models: a generator of clips.

`pipeline/` builds `RenderRequest`s and calls `VideoGenerator.generate`; everything it knows about
a model comes through this module (what it is, which requests it accepts, and the frames it makes).
Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


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
    patch size); the frame count a multiple of `frame_multiple` (the VAE's temporal factor).
    """

    size_multiple: int
    min_size: int
    max_size: int
    max_pixels: int
    frame_multiple: int
    max_frames: int
    min_fps: int
    max_fps: int
    max_steps: int
    default_width: int
    default_height: int
    default_fps: int
    default_seconds: float
    default_steps: int
    default_guidance: float


@dataclass(frozen=True)
class RenderRequest:
    """One clip to sample. `frames` is the pixel-frame count (a multiple of `frame_multiple`).

    `cond_frames` (uint8 K×H×W×3) with `cond_index` (K pixel-frame positions) give frames that are
    known (image→video, extension); they are encoded and held fixed through frame conditioning.
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


@dataclass
class RenderOutput:
    """Frames of one clip (uint8, T×H×W×3) and seconds spent per stage (text, sample, decode)."""

    frames: np.ndarray
    timings: dict[str, float]


@runtime_checkable
class VideoGenerator(Protocol):
    info: ModelInfo
    limits: GridLimits

    def generate(self, requests: Sequence[RenderRequest]) -> list[RenderOutput]:
        """Sample each request. The same request gives the same frames on the same machine,
        whatever else is in the batch."""
        ...
