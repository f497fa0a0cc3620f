"""The `VideoGenerator` the pipeline calls: caption → text states → DiT sampler → VAE decode → frames.

    gen = load_generator("default")                  # models.interface; or "tiny", a .json, a folder / URI
    [out] = gen.generate([RenderRequest(caption="A red circle moves right.", width=64, height=64,
                                        frames=16, fps=8, seed=1, steps=20, guidance=4.5)])
    out.frames  # uint8 (16, 64, 64, 3); out.timings == {"text": s, "sample": s, "decode": s}

Each request is sampled on its own with noise from a CPU generator seeded by its seed, so a
request gives the same frames on the same machine whatever else is in the batch. On CUDA the DiT
and VAE run under bf16 autocast; on CPU everything is fp32.

One model spread over a process group (sp x tp x cfg ranks, `models/parallel.py`) is the same
generator with a parallel DiT, sampler and decode (`ParallelVideoGenerator`): every rank of the
group calls `generate` with the same requests and every rank gets the same frames back.

    join_render_group(rank, world, master_addr, master_port)          # one process per rank
    gen = load_generator("default", parallel=ParallelConfig(sp=2))    # in each rank's process

(`load_generator`, `describe_model` and `join_render_group` live in `models.interface`.)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np
import torch

from models.config import ConfigError, ModelConfig, ParallelConfig
from models.handoff import HandsOver, TextStates, check_parts
from models.render_types import GridLimits, ModelInfo, RenderOutput, RenderRequest
from models.sampler import FlowMatchSampler
from models.step_cache import StepCache
from models.text import TextEncoder
from models.weights import load_modules


def grid_limits(config: ModelConfig) -> GridLimits:
    """The requests a model accepts: multiples from the VAE and patch size, the rest from `grid`."""
    g, p = config.grid, config.dit.patch_size
    size_multiple = config.vae.spatial_compression * p[1]
    frame_multiple = config.vae.temporal_compression * p[0]
    max_frames = g.max_frames // frame_multiple * frame_multiple
    window = max_frames if g.window_frames is None else g.window_frames
    context = g.context_frames if g.context_frames is not None else window // 2 // frame_multiple * frame_multiple
    if window % frame_multiple or not frame_multiple <= window <= max_frames:
        raise ConfigError(f"config {config.name!r}: grid.window_frames={window} must be a multiple of "
                          f"{frame_multiple} in {frame_multiple}..{max_frames}")
    if context % frame_multiple or not 0 < context < window:
        if window < max_frames or context:
            raise ConfigError(f"config {config.name!r}: grid.context_frames={context} must be a multiple of "
                              f"{frame_multiple} greater than 0 and less than window_frames={window}")
    limits = GridLimits(
        size_multiple=size_multiple,
        min_size=-(-max(g.min_size, size_multiple) // size_multiple) * size_multiple,
        max_size=g.max_size // size_multiple * size_multiple,
        max_pixels=g.max_pixels,
        frame_multiple=frame_multiple,
        max_frames=g.max_frames // frame_multiple * frame_multiple,
        window_frames=window,
        context_frames=context,
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


class DiffusionVideoGenerator(HandsOver):
    """A `VideoGenerator`: text encoder + `VideoDiT` + rectified-flow sampler + `VideoAutoencoder`.

    `parts` (`models/handoff.py`; None: all): what to load of it, for a render whose stages run apart: "text"
    (`encode_captions`), "dit" with "vae" (`generate_latents` from captions' states handed over), "vae"
    (`decode_latents`).
    """

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None, dtype: str | None = None,
                 parts: tuple[str, ...] | None = None):
        self.config = config
        self.parts = check_parts(parts)
        self.device = torch.device(device) if device is not None else default_device()
        self.limits = grid_limits(config)
        modules, sha = load_modules(config)
        self.vae = modules["vae"].to(self.device).requires_grad_(False) if "vae" in self.parts else None
        self.dit = modules["dit"].to(self.device).requires_grad_(False) if "dit" in self.parts else None
        self.text_encoder = TextEncoder(config.text, self.device) if "text" in self.parts else None
        self.sampler = FlowMatchSampler(config.sampler.steps, config.sampler.guidance, config.sampler.shift)
        self.info = ModelInfo(name=config.name, version=config.version, weights_sha256=sha)
        # the weights stay fp32; `dtype` is the autocast precision (None: bfloat16 on GPUs, none on CPUs)
        if dtype is None:
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
        self.precision = dtype

    def check(self, request: RenderRequest) -> None:
        self.limits.check(request)

    def compile_blocks(self) -> None:
        """`torch.compile` each transformer block in place (`nn.Module.compile`: the weights and their names
        stay; every block has the same code, so one compiled graph serves them all)."""
        dit = getattr(self.dit, "dit", self.dit)  # a ParallelVideoDiT wraps the model
        for block in dit.blocks if dit is not None else ():
            block.compile()

    @torch.no_grad()
    def generate(self, requests: Sequence[RenderRequest], text_states: TextStates | None = None,
                 decode: bool = True) -> list[RenderOutput]:
        self.require("dit", "sample a clip")
        for request in requests:  # all or nothing: reject before spending time on any
            self.check(request)
            if not decode and not self.hands_over(request):
                raise ValueError("this request decodes where it samples (given frames, or more than one window)")
        with self.text_from(text_states):
            return [self._generate_one(request, decode) for request in requests]

    # --- the stages apart (models/handoff.py) ---------------------------------------------------

    def encode_captions(self, captions: Sequence[str]) -> TextStates:
        """{caption: (states, mask)} on the CPU, each caption encoded on its own (as `generate` encodes it)."""
        self.require("text", "encode captions")
        return {c: tuple(t.cpu() for t in self.text_encoder.encode([c])) for c in dict.fromkeys(captions)}

    def hands_over(self, r: RenderRequest) -> bool:
        """A request sampled in one window from noise or a remix: its frames are its latents' decode. (Given
        frames are returned as given, and a long clip's windows are conditioned on the frames decoded
        before them: those decode where they sample.)"""
        return r.cond_frames is None and r.strength > 0 and len(self.windows(r)) == 1

    def generate_latents(self, requests: Sequence[RenderRequest], text_states: TextStates | None = None
                         ) -> list[RenderOutput]:
        return self.generate(requests, text_states, decode=False)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        self.require("vae", "decode latents")
        return self.decode_frames(latents.to(self.device))

    def caption_states(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, mask) of the captions: the ones handed over (`text_from`), else this generator's encoder's."""
        given = [self.given_states(c) for c in captions]
        if given[0] is None:
            return self.text_encoder.encode(list(captions))
        return torch.cat([g[0] for g in given]), torch.cat([g[1] for g in given])

    @torch.no_grad()
    def generate_together(self, requests: Sequence[RenderRequest]) -> list[RenderOutput]:
        """Like `generate`, but requests of one `batch_key` are sampled as one batch (serving's
        batcher: one DiT forward per step for all of them, where a GPU has width to spare).

        Each request keeps its own seeded noise, caption and negative caption, so its frames are
        `generate`'s to rounding: a batch of other shapes rounds differently in the matrix products
        (measured on this CPU: at most one level of 255 apart). Requests that cannot share a batch
        (given frames, a remix, more than one window, a step cache) are sampled alone. Each output's timings carry
        `batch`, the number of requests its batch held.
        """
        self.require("dit", "sample a clip")
        for request in requests:
            self.check(request)
        outputs: list[RenderOutput | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self.batch_key(r) or ("alone", i), []).append(i)
        for key, members in groups.items():
            if key[0] == "alone":
                out = outputs[members[0]] = self._generate_one(requests[members[0]])
                out.timings["batch"] = 1
            else:
                for i, out in zip(members, self._generate_batch([requests[i] for i in members])):
                    outputs[i] = out
        return outputs

    def batch_key(self, r: RenderRequest) -> tuple | None:
        """What requests must share to be sampled in one batch (None: this one samples alone)."""
        if (r.cond_frames is not None or r.init_frames is not None or r.strength != 1.0 or len(self.windows(r)) > 1
                or r.step_cache is not None):  # the step cache decides per request
            return None
        return ("t2v", r.width, r.height, r.frames, r.steps, r.guidance)

    def _generate_batch(self, rs: Sequence[RenderRequest]) -> list[RenderOutput]:
        """Single-window text→video requests of one `batch_key`, sampled together."""
        t0 = self._now()
        text, text_mask = self.caption_states([r.caption for r in rs])
        uncond, uncond_mask = self.caption_states([r.negative_caption for r in rs])
        t1 = self._now()
        shape = (1, *self.vae.latent_shape(rs[0].frames, rs[0].height, rs[0].width))
        noise = torch.cat([torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(r.seed))
                           for r in rs])
        with self._autocast():
            latents = self.sampler.sample(self.dit, noise.to(self.device), text, text_mask, uncond, uncond_mask,
                                          steps=rs[0].steps, guidance=rs[0].guidance)
        t2 = self._now()
        outputs = []
        for i in range(len(rs)):
            t3 = self._now()
            frames = self.decode_frames(latents[i:i + 1])
            outputs.append(RenderOutput(frames=frames, timings={
                "text": (t1 - t0) / len(rs), "sample": (t2 - t1) / len(rs), "decode": self._now() - t3,
                "batch": len(rs)}))
        return outputs

    def _generate_one(self, r: RenderRequest, decode: bool = True) -> RenderOutput:
        t0 = self._now()
        text, text_mask = self.caption_states([r.caption])
        uncond, uncond_mask = self.caption_states([r.negative_caption])
        timings = {"text": self._now() - t0, "sample": 0.0}
        if not decode:  # a request this generator `hands_over`: one window from noise or a remix
            cache = None if r.step_cache is None else self.new_step_cache(r.step_cache)
            latents = self._window_latents(r, text, text_mask, uncond, uncond_mask, timings, cache)
            return RenderOutput(frames=None, latents=latents.cpu(), timings=timings,
                                steps_computed=None if cache is None else cache.steps_computed)
        timings["decode"] = 0.0
        caches: list[StepCache] = []
        if r.strength == 0.0:  # a remix at strength 0 is the input itself
            return RenderOutput(frames=np.array(r.init_frames, dtype=np.uint8), timings=timings)

        out = np.zeros((r.frames, r.height, r.width, 3), dtype=np.uint8)
        have = np.zeros(r.frames, dtype=bool)  # frames given or already sampled
        if r.cond_frames is not None:
            for i, frame in zip(r.cond_index, r.cond_frames):
                out[i], have[i] = frame, True
        for w, (a, b) in enumerate(self.windows(r)):
            index = tuple(int(i) for i in np.flatnonzero(have[a:b]))
            window = dataclasses.replace(
                r, frames=b - a, seed=window_seed(r.seed, w),
                cond_frames=out[a:b][list(index)] if index else None, cond_index=index,
                init_frames=None if r.init_frames is None else r.init_frames[a:b])
            cache = None if r.step_cache is None else self.new_step_cache(r.step_cache)
            frames = self._sample_window(window, text, text_mask, uncond, uncond_mask, timings, cache)
            caches += [cache] if cache is not None else []
            new = ~have[a:b]
            out[a:b][new] = frames[new]
            have[a:b] = True
        steps_computed = sum(c.steps_computed for c in caches) if caches else None
        return RenderOutput(frames=out, timings=timings, steps_computed=steps_computed)

    def new_step_cache(self, threshold: float) -> StepCache:
        """The step cache of one window's sampling (one process: nothing to agree on)."""
        return StepCache(threshold)

    def windows(self, r: RenderRequest) -> list[tuple[int, int]]:
        """The [start, end) frame ranges sampled one after another for a request.

        One window when the request fits `window_frames`. Otherwise windows of that length, each
        overlapping the one before by `context_frames` (the last one aligned to the clip's end):
        forward from the start, or backward from the end when the only given frames are at the
        end (extension backwards), so each window conditions on frames already there.
        """
        n, size, step = r.frames, self.limits.window_frames, self.limits.window_frames - self.limits.context_frames
        if n <= size:
            return [(0, n)]
        starts = window_starts(n, size, step)
        given = sorted(r.cond_index) if r.cond_frames is not None else []
        if given and given[0] >= n - size and given[-1] == n - 1:  # only a suffix is given
            return [(n - s - size, n - s) for s in starts]
        return [(s, s + size) for s in starts]

    def _sample_window(self, r: RenderRequest, text, text_mask, uncond, uncond_mask,
                       timings: dict[str, float], step_cache: StepCache | None = None) -> np.ndarray:
        """Frames (uint8 T×H×W×3) of one window; adds its seconds to `timings`."""
        latents = self._window_latents(r, text, text_mask, uncond, uncond_mask, timings, step_cache)
        t2 = self._now()
        frames = self.decode_frames(latents)
        timings["decode"] += self._now() - t2
        return frames

    def _window_latents(self, r: RenderRequest, text, text_mask, uncond, uncond_mask,
                        timings: dict[str, float], step_cache: StepCache | None = None) -> torch.Tensor:
        """The sampled latents (1, C, T', H', W') of one window; adds its seconds to `timings`["sample"]."""
        t1 = self._now()
        shape = (1, *self.vae.latent_shape(r.frames, r.height, r.width))
        noise = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(r.seed))
        with self._autocast():
            cond_latents, cond_mask = self.encode_conditioning(r)
            remix = r.init_frames is not None and r.strength < 1.0
            init = self.vae.encode(pixels_to_video(r.init_frames, self.device)).float() if remix else None
            latents = self.sampler.sample(
                self.dit, noise.to(self.device), text, text_mask, uncond, uncond_mask,
                cond_latents=cond_latents, cond_mask=cond_mask, steps=r.steps, guidance=r.guidance,
                init_latents=init, strength=r.strength if remix else 1.0, step_cache=step_cache,
            )
        timings["sample"] += self._now() - t1
        return latents

    def decode_frames(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 frames (T, H, W, 3) of one window's latents (1, C, T', H', W')."""
        with self._autocast():
            video = self.vae.decode(latents)  # (1, 3, T, H, W), about [-1, 1]
        return video_to_frames(video).cpu().numpy()

    def encode_conditioning(self, r: RenderRequest) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Latents and latent-frame mask (1, T') of a request's given frames; (None, None) if none.

        A latent frame is given when any of its pixel frames is. Every pixel frame that is not
        given is filled with the nearest given one, as the VAE's causal padding repeats a clip's
        first frame: a given prefix (image→video, extension) encodes exactly as it would alone,
        and a given suffix (backward extension) as after a held copy of its first frame, nearer
        to the clip the encoder saw in training than mid-gray frames are.
        """
        if r.cond_frames is None or not len(r.cond_index):
            return None, None
        ft = self.vae.temporal_compression
        known = dict(zip(r.cond_index, torch.from_numpy(np.asarray(r.cond_frames)).float() / 127.5 - 1))
        pixels = torch.stack([known[min(known, key=lambda k: (abs(k - i), k))] for i in range(r.frames)])
        mask = torch.zeros(1, r.frames // ft)
        mask[0, sorted({i // ft for i in known})] = 1
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


class ParallelVideoGenerator(DiffusionVideoGenerator):
    """One rank of a generator spread over a process group: the sp x tp x cfg layout of
    `models/parallel.py` (USP attention, Megatron TP, CFG on two ranks) and a tiled VAE decode whose
    tiles are spread over the ranks.

    The process must have joined the group first (`models.parallel.init_distributed`); `group` is
    the replica's process group (None: the default world). Every rank calls `generate` with the
    same requests, in the same order, and every rank gets the same frames back: rank 0 of the
    group decodes (with the other ranks' tiles) and broadcasts each window's frames, which the
    next window of a long clip is conditioned on. A layout that cannot work with the model is
    refused here, before any request (`ParallelConfigError`, one line).
    """

    #: latent frames per decode chunk and latent pixels per decode tile side; tiles overlap by twice
    #: the decoder's receptive radius + 1, which makes the tiled decode the plain one (to rounding)
    DECODE_TILE = (4, 64, 64)

    def __init__(self, config: ModelConfig, parallel: ParallelConfig, group=None,
                 device: torch.device | str | None = None, dtype: str | None = None,
                 parts: tuple[str, ...] | None = None):
        from models.config import check_layout
        from models.parallel import ParallelSampler, build_mesh, parallelize
        from models.vae import decoder_receptive_field

        check_layout(parallel, config.dit, guidance=config.sampler.guidance)  # before loading weights
        if "dit" not in check_parts(parts):
            raise ValueError("a parallel group samples: its parts must include 'dit'")
        super().__init__(config, device, dtype, parts)
        self.mesh = build_mesh(parallel, config.dit, group=group, guidance=config.sampler.guidance)
        self.dit = parallelize(self.dit, self.mesh)
        s = config.sampler
        self.sampler = ParallelSampler(self.mesh, s.steps, s.guidance, s.shift)
        self.decode_overlap = 2 * decoder_receptive_field(self.vae.decoder)[1] + 1

    def new_step_cache(self, threshold: float) -> StepCache:
        """A step cache whose decisions are agreed over the whole group (tp copies do not count twice)."""
        return StepCache(threshold, group=self.mesh.replica_group, contributes=self.mesh.tp_rank == 0)

    def decode_frames(self, latents: torch.Tensor) -> np.ndarray:
        """The tiled decode spread over the group (video on rank 0), then broadcast to every rank."""
        import torch.distributed as dist

        group = self.mesh.replica_group
        with self._autocast():
            video = self.vae.decode_tiled(latents, tile=self.DECODE_TILE, overlap=self.decode_overlap, group=group)
        if video is not None:  # rank 0
            frames = video_to_frames(video).contiguous()
        else:
            _, _, t, h, w = latents.shape
            fs, ft = self.vae.spatial_compression, self.vae.temporal_compression
            frames = torch.empty(t * ft, h * fs, w * fs, 3, dtype=torch.uint8, device=self.device)
        dist.broadcast(frames, group=group, group_src=0)
        return frames.cpu().numpy()


def video_to_frames(video: torch.Tensor) -> torch.Tensor:
    """The VAE's output (1, 3, T, H, W), about [-1, 1], as uint8 frames (T, H, W, 3) on its device."""
    frames = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0)


def window_starts(total: int, size: int, step: int) -> list[int]:
    """Where windows of `size` start over `total` frames, `step` apart, the last one aligned to the end."""
    return list(range(0, total - size, step)) + [total - size]


def window_seed(seed: int, window: int) -> int:
    """The noise seed of a request's `window`-th window (the first uses the request's own seed)."""
    return seed if window == 0 else (seed + window * 0x9E3779B97F4A7C15) % 2**63


def pixels_to_video(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) as the VAE's input (1, 3, T, H, W) in [-1, 1]."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1
    return video.permute(3, 0, 1, 2)[None].to(device)
