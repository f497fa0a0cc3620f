"""`WanVideoGenerator`: a Wan text-to-video checkpoint in diffusers' layout as a `VideoGenerator`.

    gen = load_generator("/models/Wan2.1-T2V-1.3B-Diffusers")      # models.interface
    [out] = gen.generate([RenderRequest(caption="A cat bakes a cake.", width=832, height=480,
                                        frames=81, fps=16, seed=1, steps=50, guidance=5.0)])
    out.frames  # uint8 (81, 480, 832, 3); out.timings == {"text": s, "sample": s, "decode": s}

The model code is diffusers' (`WanTransformer3DModel`, `AutoencoderKLWan`, the folder's scheduler,
`randn_tensor`, `VideoProcessor`) and transformers' (`UMT5EncoderModel`, the folder's tokenizer);
this module holds the components and runs them with the semantics of `WanPipeline.__call__`, so a
request gives the frames the pipeline gives for the same prompt, negative prompt, seed, size,
frames, steps and guidance:

- text: `prompt_clean` (diffusers'), tokens padded to 512, the encoder's states past the prompt's
  length set to zero; the negative prompt likewise, only when guidance > 1 (classifier-free
  guidance: uncond + guidance x (cond - uncond));
- noise: `randn_tensor` from `torch.Generator("cpu").manual_seed(seed)` in the latent shape
  (1, C, (frames - 1) / 4 + 1, H / 8, W / 8) (/ 16 for TI2V-5B), fp32;
- sampling: a fresh copy of the folder's scheduler (UniPC flow with its flow_shift) per request
  with `steps`; Wan 2.2 A14B switches from `transformer` to `transformer_2` (guidance `guidance_2`,
  default `guidance`) below `boundary_ratio` x num_train_timesteps; TI2V-5B (`expand_timesteps`)
  gives the transformer one timestep per latent token;
- decode: latents / (1 / latents_std) + latents_mean, the VAE's decode, then `VideoProcessor`'s
  `postprocess_video(output_type="np")` (float in [0, 1]) and `(x * 255).round()` as uint8, the
  rounding diffusers' own `numpy_to_pil` uses.

One model spread over a process group (sp x tp x cfg ranks: USP self-attention, Megatron TP, CFG on two
ranks, `models/wan/parallel.py`) is the same generator with `parallel` and `group` given: every rank
calls `generate` with the same requests and gets the same frames back (each rank decodes them).

LoRA: a request's `lora` adapters are loaded by diffusers' `WanLoraLoaderMixin` and weighted by
`set_adapters` before it samples, and unloaded before a request that names others or none
(`models/wan/lora.py`): the frames are `WanPipeline.load_lora_weights` + `set_adapters`'s.

Long and large clips: a request past the window (the variant's frames) is sampled in windows, each held to
the latents of the one before (`models/wan/windows.py`), up to the folder's `max_frames`; a clip past one
window or 1280x720 is decoded in tiles and time chunks, the tiles spread over the group's ranks
(`models/wan/vae_decode.py`: diffusers' tiled decode, frame for frame).

Modes: text→video; a still is a one-frame request (`frames=1`, what `WanPipeline(num_frames=1)`
gives); a remix (`init_frames` with `strength`) is `WanVideoToVideoPipeline.__call__`'s SDEdit: the
video preprocessed as diffusers does, encoded (the latent distribution's mode), normalised, noised
by the scheduler's `add_noise` to the first of the last `int(steps x strength)` timesteps with the
seed's `randn_tensor` noise, then sampled over those timesteps (a strength that leaves no step
returns the video itself). The same loop serves Wan 2.2's two experts and per-token timesteps,
which diffusers' video-to-video pipeline does not take. A checkpoint of this kind takes no given
frames (image→video, extension, interpolation, storyboards): `GridLimits.modes` says what it renders.
Checkpoints that take pictures (Wan 2.1 I2V / FLF2V, Wan 2.2 I2V-A14B, TI2V-5B) take a request's given frames
as its first (and last) frame with `WanImageToVideoPipeline`'s semantics: `models/wan/image_conditioning.py`
(the pictures' encoding is counted in the "text" timing).

Precision: on CPU everything runs in fp32; on CUDA the text encoder and transformers in bf16
(diffusers and transformers keep their `_keep_in_fp32_modules` in fp32) and the VAE in fp32, as
diffusers' Wan examples load it; `dtype` sets the text encoder's and transformers' dtype instead.
`offload`: the text encoder and the experts live on the CPU and each goes to the device only while
it runs (the idle expert of Wan 2.2 A14B back on the CPU), for a device that cannot hold them all;
the frames are the same. Every component is read from the local folder (`models/wan/components.py`);
nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.pipelines.wan.pipeline_wan_video2video import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from models.config import ParallelConfig
from models.handoff import HandsOver, TextStates, check_parts
from models.render_types import DTYPES, RenderOutput, RenderRequest
from models.step_cache import StepCache
from models.wan.components import load_components
from models.wan.folder import WanFolder, check_wan_layout, wan_grid_limits, wan_layer_widths, wan_model_info
from models.wan.image_conditioning import ImageConditioning, check_conditioning, image_conditioning
from models.wan.lora import WanAdapters
from models.wan.parallel import guided_prediction
from models.wan.step_cache import WanStepCache
from models.wan.vae_decode import UNTILED_MAX_PIXELS, WanTiledDecoder
from models.wan.windows import ContextHold, sample_long

#: text tokens the transformer attends to (WanPipeline's `max_sequence_length`)
MAX_SEQUENCE_LENGTH = 512


class WanVideoGenerator(HandsOver):
    """A `VideoGenerator` over a checked `WanFolder` (see the module's docstring).

    `parallel`: this process is one rank of a group running that layout over `group` (None: the
    default world, joined first); a layout the folder cannot take is refused before any weight loads.
    `parts` (`models/handoff.py`; None: all): what to load for a render whose stages run apart: "text" (the
    tokenizer and umT5: `encode_captions`), "dit" + "vae" (the experts, the image encoder and the VAE:
    `generate_latents` from text states handed over), "vae" (`decode_latents`).
    """

    def __init__(self, folder: WanFolder, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None, offload: bool = False,
                 parallel: ParallelConfig | None = None, group=None, parts: tuple[str, ...] | None = None):
        self.folder = folder
        self.parts = check_parts(parts)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
            dtype = getattr(torch, dtype)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.precision = str(self.dtype).removeprefix("torch.")  # what a clip's metadata records
        self.offload = offload
        self.limits = wan_grid_limits(folder)
        self.info = wan_model_info(folder)
        if parallel is not None:
            check_wan_layout(parallel, folder)
        parts = load_components(folder, self.device, self.dtype, offload=offload, parts=self.parts)
        self.tokenizer, self.text_encoder, self.vae = parts.tokenizer, parts.text_encoder, parts.vae
        self.scheduler = parts.scheduler  # a fresh copy samples each request
        self.image_encoder, self.image_processor = parts.image_encoder, parts.image_processor
        self.transformer, self.transformer_2 = parts.experts.get("transformer"), parts.experts.get("transformer_2")
        first = self.transformer if self.transformer is not None else self.transformer_2
        # of the text states and the transformers' input, as in WanPipeline (None: a text or decode stage)
        self.transformer_dtype = first.dtype if first is not None else None
        self.video_processor = VideoProcessor(vae_scale_factor=folder.spatial_factor)
        self.mesh = None  # the process groups of a parallel layout
        self.shards = {}  # per expert (by id): its sp token split
        if parallel is not None and parallel.world_size > 1:
            from models.parallel import build_mesh
            from models.wan.parallel import parallelize_wan

            guidance = self.limits.default_guidance
            self.mesh = build_mesh(parallel, wan_layer_widths(folder), group=group, guidance=guidance)
            for expert in parts.experts.values():
                self.shards[id(expert)] = parallelize_wan(expert, self.mesh)
        # a request's LoRA adapters (`RenderRequest.lora`), on `transformer`
        self.adapters = WanAdapters(first, token_split=self.mesh is not None and self.mesh.sp > 1)

    def compile_blocks(self) -> None:
        """`torch.compile` each expert's transformer blocks (diffusers' `compile_repeated_blocks`, which
        compiles every `WanTransformerBlock` in place)."""
        for expert in (self.transformer, self.transformer_2):
            if expert is not None:
                expert.compile_repeated_blocks()

    def check(self, request: RenderRequest) -> None:
        """The grid's rules; given frames only where the folder takes them (`check_conditioning`); no LoRA
        on a tensor-parallel layout (its linear layers are split over the ranks)."""
        self.limits.check(request)
        if request.lora and self.mesh is not None and self.mesh.tp > 1:
            raise ValueError(f"lora: LoRA adapters are not applied over tensor parallelism (tp={self.mesh.tp}); "
                             f"render these rows with --tp 1")
        check_conditioning(self.folder.image_conditioning, self.info.name, request, self.limits.modes)
        if request.init_frames is not None and request.frames > self.limits.window_frames:
            raise ValueError(f"a remix is sampled in one window: at most {self.limits.window_frames} frames, "
                             f"got {request.frames}")
        if request.cond_frames is not None and request.frames > self.limits.window_frames:
            raise ValueError(f"a clip from given frames is sampled in one window: at most "
                             f"{self.limits.window_frames} frames, got {request.frames}")

    @torch.inference_mode()
    def generate(self, requests: Sequence[RenderRequest], text_states: TextStates | None = None,
                 decode: bool = True) -> list[RenderOutput]:
        self.require("dit", "sample a clip")
        for request in requests:  # all or nothing: reject before spending time on any
            self.check(request)
            if not decode and not self.hands_over(request):
                raise ValueError("a remix at a strength that leaves no step has no latents to hand over")
        outputs = []
        with self.text_from(text_states):
            for request in requests:
                self.adapters.activate(request.lora)  # loads only when they differ from the last request's
                outputs.append(self._generate_one(request, decode))
        return outputs

    # --- the stages apart (models/handoff.py) ---------------------------------------------------

    def encode_captions(self, captions: Sequence[str]) -> TextStates:
        """{caption: (states,)} on the CPU, each as `generate` encodes it (umT5, zeros past its tokens)."""
        self.require("text", "encode captions")
        return {c: (self.encode_text(c).cpu(),) for c in dict.fromkeys(captions)}

    def hands_over(self, r: RenderRequest) -> bool:
        """Every request but a remix that takes no step (its frames are the video itself): a clip's frames are
        its latents' decode, long clips' and given pictures' included."""
        return not (r.init_frames is not None and int(r.steps * r.strength) == 0)

    def generate_latents(self, requests: Sequence[RenderRequest], text_states: TextStates | None = None
                         ) -> list[RenderOutput]:
        return self.generate(requests, text_states, decode=False)

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        self.require("vae", "decode latents")
        return self.decode(latents)

    def _generate_one(self, r: RenderRequest, decode: bool = True) -> RenderOutput:
        if not self.hands_over(r):  # a remix that takes no step: the video itself
            return RenderOutput(frames=np.array(r.init_frames, dtype=np.uint8),
                                timings={"text": 0.0, "sample": 0.0, "decode": 0.0})
        t0 = self._now()
        cfg = r.guidance > 1.0
        cond = self.encode_text(r.caption).to(self.transformer_dtype)
        uncond = self.encode_text(r.negative_caption).to(self.transformer_dtype) if cfg else None
        pictures = image_conditioning(self, r, self.latent_shape(r))
        t1 = self._now()
        caches = self.step_caches(r.step_cache)
        with contextlib.ExitStack() as hooks:
            for cache in caches.values():
                hooks.enter_context(cache)
            if r.frames > self.limits.window_frames:
                latents = sample_long(self, r, cond, uncond, caches=caches)
            else:
                latents = self.sample(r, cond, uncond, pictures, caches)
        t2 = self._now()
        computed = sum(c.step_cache.steps_computed for c in caches.values()) if caches else None
        if not decode:
            return RenderOutput(frames=None, latents=latents.cpu(), timings={"text": t1 - t0, "sample": t2 - t1},
                                steps_computed=computed)
        frames = self.decode(latents)
        return RenderOutput(frames=frames, timings={"text": t1 - t0, "sample": t2 - t1, "decode": self._now() - t2},
                            steps_computed=computed)

    def step_caches(self, threshold: float | None) -> dict[int, WanStepCache]:
        """One request's step cache per expert (by id; their residuals are not comparable), agreed over
        the parallel group; none without a threshold."""
        if threshold is None:
            return {}
        group, contributes = None, True
        if self.mesh is not None:
            group, contributes = self.mesh.replica_group, self.mesh.tp_rank == 0
        return {id(expert): WanStepCache(expert, StepCache(threshold, group, contributes), self.shards.get(id(expert)))
                for expert in (self.transformer, self.transformer_2) if expert is not None}

    def encode_text(self, text: str) -> torch.Tensor:
        """(1, 512, dim) states of a cleaned prompt, zeros past its tokens (or the ones handed over for it)."""
        given = self.given_states(text)
        if given is not None:
            return given[0]
        tokens = self.tokenizer([prompt_clean(text)], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        states = self._on_device(self.text_encoder)(ids, mask).last_hidden_state.to(self.text_encoder.dtype)
        length = int(mask.gt(0).sum())
        out = torch.zeros_like(states)
        out[:, :length] = states[:, :length]
        return out

    def latent_shape(self, r: RenderRequest) -> tuple[int, ...]:
        f, fs = self.folder, self.folder.spatial_factor
        channels = f.vae_config.get("z_dim", 16)  # the transformer's input channels, or (I2V) its noisy part
        return (1, channels, (r.frames - 1) // f.temporal_factor + 1, r.height // fs, r.width // fs)

    def sample(self, r: RenderRequest, cond: torch.Tensor, uncond: torch.Tensor | None,
               pictures: ImageConditioning | None = None,
               caches: dict[int, WanStepCache] | None = None, context: torch.Tensor | None = None) -> torch.Tensor:
        """The denoised latents (fp32) of one request: from the seed's noise (`WanPipeline`; with `pictures`
        `WanImageToVideoPipeline`), or from the request's video noised to its strength (`WanVideoToVideoPipeline`);
        `caches`: `step_caches`'. `context`: latents the first latent frames are held to (a long clip's window
        after the first: `ContextHold`)."""
        caches = caches or {}
        for cache in caches.values():  # a long clip's windows share the request's caches
            cache.step_cache.new_window()
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(r.steps, device=self.device)
        timesteps = scheduler.timesteps
        generator = torch.Generator(device="cpu").manual_seed(r.seed)
        if r.init_frames is None:
            latents = randn_tensor(self.latent_shape(r), generator=generator, device=self.device, dtype=torch.float32)
            scheduler.set_begin_index(0)
        else:
            timesteps = remix_timesteps(timesteps, r.steps, r.strength, scheduler.order)
            latents = self.noised_video_latents(r, scheduler, timesteps[:1], generator)
        ratio = self.folder.boundary_ratio
        boundary = None if ratio is None else ratio * scheduler.config.num_train_timesteps
        guidance_2 = r.guidance if r.guidance_2 is None else r.guidance_2
        hold = None if context is None else ContextHold(context, latents, scheduler)
        for t in timesteps:
            if hold is not None:
                latents = hold.before_step(latents, t)
            if boundary is None or t >= boundary:  # Wan 2.1, or the high-noise expert of Wan 2.2 A14B
                model, guidance = self.transformer, r.guidance
            else:
                model, guidance = self.transformer_2, guidance_2
            model = self._on_device(model)
            if pictures is None:
                x, timestep, states = latents.to(self.transformer_dtype), self._timestep(t, latents), None
            else:
                x, states = pictures.model_input(latents, self.transformer_dtype), pictures.image_states
                timestep = pictures.timestep(t, latents, self.folder.patch_size)
                timestep = self._timestep(t, latents) if timestep is None else timestep
            cache = caches.get(id(model))
            if cache is not None:
                cache.step_cache.start_step()
            pred = guided_prediction(model, x, timestep, cond, uncond, guidance, self.mesh, states, cache)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        if hold is not None:
            latents = hold.after_sampling(latents)
        return latents if pictures is None else pictures.finish(latents)

    def noised_video_latents(self, r: RenderRequest, scheduler, timestep: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
        """`WanVideoToVideoPipeline.prepare_latents`: the request's video encoded (the mode of its latent
        distribution), normalised, and noised to `timestep` with the seed's noise."""
        frames = r.init_frames.astype(np.float32) / 255.0  # what diffusers makes of PIL frames
        video = self.video_processor.preprocess_video(frames, height=r.height, width=r.width)
        latents = self.encode_latents(video.to(self.device, dtype=torch.float32))
        noise = randn_tensor(self.latent_shape(r), generator=generator, device=self.device, dtype=torch.float32)
        return scheduler.add_noise(latents, noise, timestep)

    def encode_latents(self, video: torch.Tensor) -> torch.Tensor:
        """A preprocessed video (1, 3, T, H, W) as the transformer's latents: the VAE's encode (the mode of its
        latent distribution), normalised by the VAE's latent mean and std, fp32 (diffusers' pipelines' steps)."""
        latents = retrieve_latents(self.vae.encode(video.to(dtype=self.vae.dtype)), sample_mode="argmax")
        mean, inv_std = self._latent_stats(torch.float32)
        return (latents.to(self.device, torch.float32) - mean) * inv_std

    def _timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input: t per clip, or (TI2V-5B) t per latent token."""
        if not self.folder.expand_timesteps:
            return t.expand(latents.shape[0])
        _, ph, pw = self.folder.patch_size
        tokens = (torch.ones(latents.shape[2:], dtype=torch.float32, device=latents.device)[:, ::ph, ::pw] * t)
        return tokens.flatten().unsqueeze(0).expand(latents.shape[0], -1)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 frames (T, H, W, 3) of one request's latents: the VAE's decode (`WanPipeline`'s) for a clip of
        one window up to 1280x720, else its tiled decode in chunks, spread over the group's ranks."""
        latents = latents.to(self.device, dtype=self.vae.dtype)
        mean, inv_std = self._latent_stats(latents.dtype)
        z = latents / inv_std + mean
        _, _, t, h, w = z.shape
        fs, ft = self.folder.spatial_factor, self.folder.temporal_factor
        if (t - 1) * ft + 1 <= self.limits.window_frames and h * w * fs * fs <= UNTILED_MAX_PIXELS:
            video = self.vae.decode(z, return_dict=False)[0]
            return frames_to_uint8(self.video_processor.postprocess_video(video, output_type="np")[0])
        group = None if self.mesh is None else self.mesh.replica_group
        frames = np.empty(((t - 1) * ft + 1, h * fs, w * fs, 3), dtype=np.uint8)
        for start, video in WanTiledDecoder(self.vae, group).iter_decode(z):
            chunk = frames_to_uint8(self.video_processor.postprocess_video(video, output_type="np")[0])
            frames[start:start + len(chunk)] = chunk
        return frames

    def _latent_stats(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's per-channel latent mean and 1 / std, shaped (1, C, 1, 1, 1), as diffusers builds them."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(self.device, dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(self.device, dtype)
        return mean, inv_std

    def _on_device(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module`, on the device; with `offload`, every other offloaded module (text encoder, experts)
        back on the CPU first."""
        if self.offload:
            for other in (self.text_encoder, self.image_encoder, self.transformer, self.transformer_2):
                if other is not None and other is not module:
                    other.to("cpu")
            module.to(self.device)
        return module

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """diffusers' float frames in [0, 1] (output_type="np") as uint8: x * 255, rounded half to even."""
    return (frames * 255).round().astype(np.uint8)


def remix_timesteps(timesteps: torch.Tensor, steps: int, strength: float, order: int = 1) -> torch.Tensor:
    """The last `int(steps x strength)` of a schedule's timesteps (`WanVideoToVideoPipeline.get_timesteps`):
    where a remix at `strength` starts sampling; none at a strength below 1 / steps."""
    t_start = max(steps - min(int(steps * strength), steps), 0)
    return timesteps[t_start * order:]
