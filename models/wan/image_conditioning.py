"""Pictures as conditions on Wan: `WanImageToVideoPipeline`'s semantics for a request's given frames.

    cond = image_conditioning(gen, request)      # None for a request with no given frames
    x = cond.model_input(latents, dtype); t_in = cond.timestep(t, latents); ...; latents = cond.finish(latents)

A request's `cond_frames` sit at `cond_index` (0,) (image→video) or (0, frames - 1) (first and last frame,
diffusers' `last_image`); which a folder takes is `WanFolder.image_conditioning` (folder.py):

- "first-latent" (Wan 2.2 TI2V-5B, `expand_timesteps`): the picture alone is encoded; its latent frame
  replaces the first latent frame of the model's input at every step with timestep 0 for its tokens (the
  others get t), and replaces it in the result. The causal VAE decodes frame 0 from that latent frame alone,
  so the clip's first frame is the picture's VAE reconstruction, exactly.
- "mask" (Wan 2.2 I2V-A14B) and "clip" / "clip-flf2v" (Wan 2.1 I2V / FLF2V): the picture (and last picture)
  with zeros for the other frames is encoded as a video; a mask of the known pixel frames (4 per latent frame,
  the first repeated 4 times) and those latents are 4 + z extra input channels beside the noisy latents. The
  CLIP kinds add the image encoder's penultimate hidden states (of both pictures for FLF2V, whose transformer
  adds a position table for two) as `encoder_hidden_states_image`.

Everything is diffusers' and transformers' own (`VideoProcessor.preprocess`, `AutoencoderKLWan.encode`'s
mode, `CLIPImageProcessor`, `CLIPVisionModel`); this module only arranges them as the pipeline does, with the
request's uint8 frames as the PIL pictures a diffusers user passes. Equality: tests/models/wan/test_wan_image.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from models.render_types import RenderRequest

#: the frame positions each image conditioning takes, as a function of the request's frame count
#: (`first` alone, or `first` and `last`)
POSITIONS = {
    "first-latent": ("first",),
    "clip": ("first",),
    "mask": ("first", "first+last"),
    "clip-flf2v": ("first+last",),
}
WHAT = {"first": "a first frame (image→video)", "first+last": "a first and a last frame (interpolation)"}


def positions_of(r: RenderRequest) -> str | None:
    """"first", "first+last", or None for given frames elsewhere."""
    index = tuple(r.cond_index)
    if index == (0,):
        return "first"
    if r.frames > 1 and index == (0, r.frames - 1):
        return "first+last"
    return None


def check_conditioning(kind: str | None, name: str, r: RenderRequest, modes: tuple[str, ...]) -> None:
    """Raise ValueError (one line) for given frames the folder cannot take, or a text-only request to a
    folder that needs a picture; `modes`: what the folder renders, as the text-to-video refusal names it."""
    if r.cond_frames is None:
        if kind in ("mask", "clip", "clip-flf2v"):
            raise ValueError(f"{name} is an image-to-video checkpoint: it needs {WHAT[POSITIONS[kind][0]]}")
        return
    if kind is None:
        raise ValueError(f"{name} takes no given frames (image→video, extension, interpolation, storyboards): it "
                         f"renders {', '.join(modes)}")
    where = positions_of(r)
    if where not in POSITIONS[kind]:
        takes = " or ".join(WHAT[p] for p in POSITIONS[kind])
        raise ValueError(f"{name} takes {takes}, not given frames at {tuple(r.cond_index)}")
    if r.init_frames is not None:
        raise ValueError(f"{name}: a remix takes no given frames")


@dataclass
class ImageConditioning:
    """One request's conditioning. `condition`: the pictures' normalised latents (first-latent: the first
    latent frame's, (1, z, 1, h, w)), or mask and latents (1, 4 + z, T, h, w); `first_frame_mask` (first-latent
    only) 0 on the first latent frame, 1 elsewhere; `image_states` the CLIP states, or None."""

    condition: torch.Tensor
    first_frame_mask: torch.Tensor | None
    image_states: torch.Tensor | None

    def model_input(self, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The transformer's input at a step: the first latent frame replaced, or the condition channels added."""
        if self.first_frame_mask is not None:
            m = self.first_frame_mask
            return ((1 - m) * self.condition + m * latents).to(dtype)
        return torch.cat([latents, self.condition], dim=1).to(dtype)

    def timestep(self, t: torch.Tensor, latents: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor | None:
        """Per-token timesteps with the first latent frame's at 0 (first-latent); None: the caller's own."""
        if self.first_frame_mask is None:
            return None
        _, ph, pw = patch
        tokens = (self.first_frame_mask[0][0][:, ::ph, ::pw] * t).flatten()
        return tokens.unsqueeze(0).expand(latents.shape[0], -1)

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampled latents with the first latent frame the picture's (first-latent); else as they are."""
        if self.first_frame_mask is None:
            return latents
        m = self.first_frame_mask
        return (1 - m) * self.condition + m * latents


def image_conditioning(gen, r: RenderRequest, latent_shape: tuple[int, ...]) -> ImageConditioning | None:
    """`WanImageToVideoPipeline.prepare_latents` (+ `encode_image`) for `r`'s given frames on the generator
    `gen` (a `WanVideoGenerator`: its folder, device, VAE, processors, image encoder); None without frames."""
    if r.cond_frames is None:
        return None
    kind = gen.folder.image_conditioning
    pictures = [Image.fromarray(np.ascontiguousarray(f)) for f in r.cond_frames]
    first, last = pictures[0], (pictures[1] if len(pictures) > 1 else None)
    states = None
    if kind in ("clip", "clip-flf2v"):
        inputs = gen.image_processor(images=first if last is None else [first, last], return_tensors="pt")
        encoder = gen._on_device(gen.image_encoder)
        hidden = encoder(**inputs.to(gen.device), output_hidden_states=True).hidden_states[-2]
        states = hidden.to(gen.device, gen.transformer_dtype)

    def preprocess(picture: Image.Image) -> torch.Tensor:  # (1, 3, 1, H, W) in [-1, 1], fp32
        image = gen.video_processor.preprocess(picture, height=r.height, width=r.width)
        return image.to(gen.device, dtype=torch.float32).unsqueeze(2)

    image = preprocess(first)
    _, _, frames_latent, h, w = latent_shape
    if kind == "first-latent":
        video = image
    else:
        gap = r.frames - 1 if last is None else r.frames - 2
        parts = [image, image.new_zeros(1, 3, gap, r.height, r.width)] + ([] if last is None else [preprocess(last)])
        video = torch.cat(parts, dim=2)
    latents = gen.encode_latents(video)
    if kind == "first-latent":
        mask = torch.ones(1, 1, frames_latent, h, w, dtype=torch.float32, device=gen.device)
        mask[:, :, 0] = 0
        return ImageConditioning(latents, mask, states)
    ft = gen.folder.temporal_factor
    known = torch.zeros(1, 1, r.frames, h, w)
    known[:, :, 0] = 1
    if last is not None:
        known[:, :, -1] = 1
    known = torch.cat([known[:, :, :1].repeat_interleave(ft, dim=2), known[:, :, 1:]], dim=2)
    mask = known.view(1, -1, ft, h, w).transpose(1, 2).to(latents.device)
    return ImageConditioning(torch.cat([mask, latents], dim=1), None, states)
