"""The `VideoGenerator` the pipeline calls: caption → text states → DiT sampler → VAE decode → frames.

    gen = load_generator("default")                  # or "tiny", a .json, a folder / URI
    [out] = gen.generate([RenderRequest(caption="A red circle moves right.", width=64, height=64,
                                        frames=16, fps=8, seed=1, steps=20, guidance=4.5)])
    out.frames  # uint8 (16, 64, 64, 3); out.timings == {"text": s, "sample": s, "decode": s}

Each request is sampled on its own with noise from a CPU generator seeded by its seed, so a
request gives the same frames on the same machine whatever else is in the batch. On CUDA the DiT
and VAE run under bf16 autocast; on CPU everything is fp32.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from models.config import ConfigError, ModelConfig, load_config
from models.interface import GridLimits, ModelInfo, RenderOutput, RenderRequest
from models.sampler import FlowMatchSampler
from models.text import TextEncoder
from models.weights import load_modules, weights_sha256


def grid_limits(config: ModelConfig) -> GridLimits:
    """The requests a model accepts: multiples from the VAE and patch size, the rest from `grid`."""
    g, p = config.grid, config.dit.patch_size
    size_multiple = config.vae.spatial_compression * p[1]
    frame_multiple = config.vae.temporal_compression * p[0]
    limits = GridLimits(
        size_multiple=size_multiple,
        min_size=-(-max(g.min_size, size_multiple) // size_multiple) * size_multiple,
        max_size=g.max_size // size_multiple * size_multiple,
        max_pixels=g.max_pixels,
        frame_multiple=frame_multiple,
        max_frames=g.max_frames // frame_multiple * frame_multiple,
        min_fps=g.min_fps,
        max_fps=g.max_fps,
        max_steps=g.max_steps,
        default_width=g.default_width,
        default_height=g.default_height,
        default_fps=g.default_fps,
        default_seconds=g.default_seconds,
        default_steps=config.sampler.steps,
        default_guidance=config.sampler.guidance,
    )
    default_frames = round(g.default_seconds * g.default_fps)
    for name, v, m in (("default_width", g.default_width, size_multiple),
                       ("default_height", g.default_height, size_multiple),
                       ("default frames (default_seconds * default_fps)", default_frames, frame_multiple)):
        if v % m:
            raise ConfigError(f"config {config.name!r}: grid.{name}={v} is not a multiple of {m}")
    if limits.min_size > limits.max_size or limits.max_frames < frame_multiple:
        raise ConfigError(f"config {config.name!r}: the grid admits no request")
    return limits


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class DiffusionVideoGenerator:
    """A `VideoGenerator`: text encoder + `VideoDiT` + rectified-flow sampler + `VideoAutoencoder`."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None):
        self.config = config
        self.device = torch.device(device) if device is not None else default_device()
        self.limits = grid_limits(config)
        modules, sha = load_modules(config)
        self.vae = modules["vae"].to(self.device).requires_grad_(False)
        self.dit = modules["dit"].to(self.device).requires_grad_(False)
        self.text_encoder = TextEncoder(config.text, self.device)
        self.sampler = FlowMatchSampler(config.sampler.steps, config.sampler.guidance, config.sampler.shift)
        self.info = ModelInfo(name=config.name, version=config.version, weights_sha256=sha)
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None

    def check(self, request: RenderRequest) -> None:
        self.limits.check(request)

    @torch.no_grad()
    def generate(self, requests: Sequence[RenderRequest]) -> list[RenderOutput]:
        for request in requests:  # all or nothing: reject before spending time on any
            self.check(request)
        return [self._generate_one(request) for request in requests]

    def _generate_one(self, r: RenderRequest) -> RenderOutput:
        t0 = self._now()
        text, text_mask = self.text_encoder.encode([r.caption])
        uncond, uncond_mask = self.text_encoder.encode([r.negative_caption])
        t1 = self._now()

        shape = (1, *self.vae.latent_shape(r.frames, r.height, r.width))
        noise = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(r.seed))
        with self._autocast():
            cond_latents, cond_mask = self.encode_conditioning(r)
            latents = self.sampler.sample(
                self.dit, noise.to(self.device), text, text_mask, uncond, uncond_mask,
                cond_latents=cond_latents, cond_mask=cond_mask, steps=r.steps, guidance=r.guidance,
            )
        t2 = self._now()

        with self._autocast():
            video = self.vae.decode(latents)  # (1, 3, T, H, W), about [-1, 1]
        frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        frames = frames.permute(1, 2, 3, 0).cpu().numpy()  # (T, H, W, 3)
        t3 = self._now()
        return RenderOutput(frames=frames, timings={"text": t1 - t0, "sample": t2 - t1, "decode": t3 - t2})

    def encode_conditioning(self, r: RenderRequest) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Latents and latent-frame mask (1, T') of a request's given frames; (None, None) if none.

        A latent frame is given when any of its pixel frames is; its other pixel frames are filled
        with the nearest given one. Frames before a given one are mid-gray: the VAE is causal, so
        a given prefix (image→video, extension) encodes exactly as it would alone.
        """
        if r.cond_frames is None or not len(r.cond_index):
            return None, None
        ft = self.vae.temporal_compression
        pixels = torch.zeros(r.frames, r.height, r.width, 3)
        known = dict(zip(r.cond_index, torch.from_numpy(np.asarray(r.cond_frames)).float() / 127.5 - 1))
        mask = torch.zeros(1, r.frames // ft)
        for group in {i // ft for i in known}:
            given = [i for i in range(group * ft, (group + 1) * ft) if i in known]
            for i in range(group * ft, (group + 1) * ft):
                pixels[i] = known[min(given, key=lambda k: abs(k - i))]
            mask[0, group] = 1
        video = pixels.permute(3, 0, 1, 2)[None].to(self.device)  # (1, 3, T, H, W)
        return self.vae.encode(video).float(), mask.to(self.device)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def load_generator(spec: str | ModelConfig = "default", device: torch.device | str | None = None,
                   num_threads: int | None = None) -> DiffusionVideoGenerator:
    """A ready generator for a config (shipped name, .json path, folder or URI, or a ModelConfig).

    `num_threads` sets torch's intra-op threads for this process (CPU rendering).
    """
    if num_threads:
        torch.set_num_threads(int(num_threads))
    config = spec if isinstance(spec, ModelConfig) else load_config(spec)
    return DiffusionVideoGenerator(config, device=device)


def describe_model(spec: str | ModelConfig = "default") -> tuple[ModelInfo, GridLimits, str | None]:
    """(info, limits, recaptioner name or None) without loading the text encoder or moving anything
    to a device: what a driver needs to validate a manifest and label outputs."""
    config = spec if isinstance(spec, ModelConfig) else load_config(spec)
    info = ModelInfo(name=config.name, version=config.version, weights_sha256=weights_sha256(config))
    return info, grid_limits(config), config.recaptioner
