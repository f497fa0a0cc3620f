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

On CPU everything runs in fp32; on CUDA the text encoder and transformers in bf16 (diffusers and
transformers keep their `_keep_in_fp32_modules` in fp32) and the VAE in fp32, as diffusers'
Wan examples load it; `dtype` sets the text encoder's and transformers' dtype instead. Every
component is read from the local folder (`models/wan/components.py`); nothing is downloaded.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from models.render_types import RenderOutput, RenderRequest
from models.wan.components import load_components
from models.wan.folder import WanFolder, wan_grid_limits, wan_model_info

#: text tokens the transformer attends to (WanPipeline's `max_sequence_length`)
MAX_SEQUENCE_LENGTH = 512


class WanVideoGenerator:
    """A `VideoGenerator` over a checked `WanFolder` (see the module's docstring)."""

    def __init__(self, folder: WanFolder, device: torch.device | str | None = None,
                 dtype: torch.dtype | str | None = None):
        self.folder = folder
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.precision = str(self.dtype).removeprefix("torch.")  # what a clip's metadata records
        self.limits = wan_grid_limits(folder)
        self.info = wan_model_info(folder)
        parts = load_components(folder, self.device, self.dtype)
        self.tokenizer, self.text_encoder, self.vae = parts.tokenizer, parts.text_encoder, parts.vae
        self.scheduler = parts.scheduler  # a fresh copy samples each request
        self.transformer, self.transformer_2 = parts.experts.get("transformer"), parts.experts.get("transformer_2")
        first = self.transformer if self.transformer is not None else self.transformer_2
        self.transformer_dtype = first.dtype  # of the text states and the transformers' input, as in WanPipeline
        self.video_processor = VideoProcessor(vae_scale_factor=folder.spatial_factor)

    def check(self, request: RenderRequest) -> None:
        """The grid's rules, and text→video only: no given frames, no video to remix (yet)."""
        self.limits.check(request)
        if request.cond_frames is not None or request.init_frames is not None:
            raise ValueError(f"{self.info.name} renders text→video only: it takes no given frames (image→video, "
                             f"extension, interpolation) and no video to remix")

    @torch.no_grad()
    def generate(self, requests: Sequence[RenderRequest]) -> list[RenderOutput]:
        for request in requests:  # all or nothing: reject before spending time on any
            self.check(request)
        return [self._generate_one(request) for request in requests]

    def _generate_one(self, r: RenderRequest) -> RenderOutput:
        t0 = self._now()
        cfg = r.guidance > 1.0
        cond = self.encode_text(r.caption).to(self.transformer_dtype)
        uncond = self.encode_text(r.negative_caption).to(self.transformer_dtype) if cfg else None
        t1 = self._now()
        latents = self.sample(r, cond, uncond)
        t2 = self._now()
        frames = self.decode(latents)
        return RenderOutput(frames=frames, timings={"text": t1 - t0, "sample": t2 - t1, "decode": self._now() - t2})

    def encode_text(self, text: str) -> torch.Tensor:
        """(1, 512, dim) states of a cleaned prompt, zeros past its tokens."""
        tokens = self.tokenizer([prompt_clean(text)], padding="max_length", max_length=MAX_SEQUENCE_LENGTH,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        states = self.text_encoder(ids, mask).last_hidden_state.to(self.text_encoder.dtype)
        length = int(mask.gt(0).sum())
        out = torch.zeros_like(states)
        out[:, :length] = states[:, :length]
        return out

    def latent_shape(self, r: RenderRequest) -> tuple[int, ...]:
        f, fs = self.folder, self.folder.spatial_factor
        channels = f.transformer_config.get("in_channels", 16)
        return (1, channels, (r.frames - 1) // f.temporal_factor + 1, r.height // fs, r.width // fs)

    def sample(self, r: RenderRequest, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """The denoised latents (fp32) of one request."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(r.steps, device=self.device)
        generator = torch.Generator(device="cpu").manual_seed(r.seed)
        latents = randn_tensor(self.latent_shape(r), generator=generator, device=self.device, dtype=torch.float32)
        scheduler.set_begin_index(0)
        ratio = self.folder.boundary_ratio
        boundary = None if ratio is None else ratio * scheduler.config.num_train_timesteps
        guidance_2 = r.guidance if r.guidance_2 is None else r.guidance_2
        for t in scheduler.timesteps:
            if boundary is None or t >= boundary:  # Wan 2.1, or the high-noise expert of Wan 2.2 A14B
                model, guidance = self.transformer, r.guidance
            else:
                model, guidance = self.transformer_2, guidance_2
            x = latents.to(self.transformer_dtype)
            timestep = self._timestep(t, latents)
            pred = model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond, return_dict=False)[0]
            if uncond is not None:
                pred_uncond = model(hidden_states=x, timestep=timestep, encoder_hidden_states=uncond,
                                    return_dict=False)[0]
                pred = pred_uncond + guidance * (pred - pred_uncond)
            latents = scheduler.step(pred, t, latents, return_dict=False)[0]
        return latents

    def _timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep input: t per clip, or (TI2V-5B) t per latent token."""
        if not self.folder.expand_timesteps:
            return t.expand(latents.shape[0])
        _, ph, pw = self.folder.patch_size
        tokens = (torch.ones(latents.shape[2:], dtype=torch.float32, device=latents.device)[:, ::ph, ::pw] * t)
        return tokens.flatten().unsqueeze(0).expand(latents.shape[0], -1)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """uint8 frames (T, H, W, 3) of one request's latents."""
        cfg = self.vae.config
        latents = latents.to(self.device, dtype=self.vae.dtype)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        video = self.vae.decode(latents / inv_std + mean, return_dict=False)[0]
        frames = self.video_processor.postprocess_video(video, output_type="np")[0]  # (T, H, W, 3) in [0, 1]
        return frames_to_uint8(frames)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def frames_to_uint8(frames: np.ndarray) -> np.ndarray:
    """diffusers' float frames in [0, 1] (output_type="np") as uint8: x * 255, rounded half to even."""
    return (frames * 255).round().astype(np.uint8)
