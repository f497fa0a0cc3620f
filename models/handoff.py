"""What a disaggregated render hands from one stage to the next: the captions' text states to the sampler,
the sampled latents to the decoder, as bytes that travel in a Ray Data row.

    text = load_generator("default", parts=("text",))          # the text stage: the encoder alone
    states = text.encode_captions(["A red circle moves right.", ""])
    dit = load_generator("default", parts=("dit", "vae"))       # the sampling stage: no text encoder
    [out] = dit.generate_latents([request], text_states=states)  # out.latents, out.frames is None
    vae = load_generator("default", parts=("vae",))             # the decode stage
    frames = vae.decode_latents(out.latents)                     # generate([request])[0].frames, exactly

Text states are a dict caption -> the tensors the model's text encoder gives for it alone (CPU tensors);
both generators encode each caption on its own, so a caption's states do not depend on the others
handed over with it. The bytes are `torch.save`'s and are read back with `weights_only=True`: tensors,
strings and containers only, never code.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads where tensors are made, not where a driver imports models.interface
    import torch

#: What a generator may be loaded with (`load_generator(parts=...)`): its text encoder(s), its denoiser
#: (with what conditions it: the VAE's encoder for given frames, an image encoder), its VAE decoder.
PARTS = ("text", "dit", "vae")

TextStates = dict[str, tuple["torch.Tensor", ...]]


def check_parts(parts: tuple[str, ...] | None) -> tuple[str, ...]:
    """`parts` as a tuple in PARTS order (None: all of them); ValueError (one line) for an unknown or empty set."""
    if parts is None:
        return PARTS
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise ValueError(f"parts {list(parts)}: each must be one of {', '.join(PARTS)}")
    if "dit" in parts and "vae" not in parts:
        raise ValueError(f"parts {list(parts)}: sampling needs the VAE too (it encodes given frames and sets the "
                         f"latents' shape); add 'vae'")
    return tuple(p for p in PARTS if p in parts)


def to_bytes(value: TextStates | torch.Tensor) -> bytes:
    """Text states or latents as bytes (CPU tensors, contiguous: only their own elements are written)."""
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
    else:
        value = {k: tuple(t.detach().cpu().contiguous() for t in v) for k, v in value.items()}
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def from_bytes(data: bytes):
    """What `to_bytes` wrote (tensors, strings and containers only: `weights_only`)."""
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


class HandsOver:
    """What both generators share of the hand-off: text states given for a call instead of their encoder's.

    A generator calls `caption_states(caption)` where it would run its text encoder: inside
    `text_from(states)` the states handed over are used (a caption that is not among them is a one-line
    error), outside them its own encoder, which a generator loaded without "text" does not have.
    """

    given_text: TextStates | None = None
    parts: tuple[str, ...] = PARTS

    @contextlib.contextmanager
    def text_from(self, states: TextStates | None) -> Iterator[None]:
        before, self.given_text = self.given_text, states
        try:
            yield
        finally:
            self.given_text = before

    def given_states(self, caption: str) -> tuple[torch.Tensor, ...] | None:
        """The states handed over for `caption`, on this generator's device; None when none were handed over
        and the generator has its text encoder."""
        if self.given_text is None:
            self.require("text", "encode a caption without text states handed over")
            return None
        try:
            return tuple(t.to(self.device) for t in self.given_text[caption])
        except KeyError:
            raise ValueError(f"no text states were handed over for the caption {caption[:60]!r}") from None

    def require(self, part: str, what: str) -> None:
        if part not in self.parts:
            raise ValueError(f"this generator was loaded with parts {list(self.parts)}: it cannot {what} "
                             f"(that needs {part!r})")
