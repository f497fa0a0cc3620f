"""What a disaggregated render (`reel render --disaggregate`) hands over per clip through the object store: its
captions' text states (caption and negative caption) and its latents, beside the frames every render moves.

    python bench/handoff.py [--model default] [--size 64x64x16]   # a model's own stages, one clip
    python bench/handoff.py --wan-shapes                            # Wan's tensors at their real shapes (zeros)

With a model, its text stage encodes the captions, its sampling stage samples the latents (`--steps`, default 2:
the size does not depend on them), and the bytes are `models.handoff.to_bytes`' (what the row carries), with the
seconds to write and read them back. `--wan-shapes` needs no checkpoint: it serialises zero tensors of the shapes
Wan's stages hand over (umT5-XXL states 512 x 4096 in bf16, as on GPUs; fp32 latents), so the sizes are exact and
nothing is claimed about speed. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: (name, frames, height, width, latent channels, spatial / temporal compression) of Wan checkpoints' sizes
WAN_SIZES = [
    ("Wan 2.1 T2V 1.3B / 14B, 832x480x81", 81, 480, 832, 16, 8, 4),
    ("Wan 2.1 T2V 14B, 1280x720x81", 81, 720, 1280, 16, 8, 4),
    ("Wan 2.2 TI2V 5B, 1280x704x121", 121, 704, 1280, 48, 16, 4),
    ("Wan 2.1 14B, 1920x1088x321 (20 s, windows)", 321, 1088, 1920, 16, 8, 4),
]


def mib(n: int) -> float:
    return round(n / 2**20, 3)


def measured(model: str, width: int, height: int, frames: int, steps: int) -> dict:
    from models.interface import RenderRequest, from_bytes, load_generator, to_bytes

    text = load_generator(model, parts=("text",))
    dit = load_generator(model, parts=("dit", "vae"))
    r = RenderRequest(caption="A red circle moves from the left of the frame to the right on a gray background.",
                      negative_caption="blurry, static", width=width, height=height, frames=frames,
                      fps=dit.limits.default_fps, seed=1, steps=steps, guidance=dit.limits.default_guidance)
    dit.check(r)
    states = text.encode_captions([r.caption, r.negative_caption])
    [out] = dit.generate_latents([r], text_states=states)
    result = {"model": model, "size": f"{width}x{height}x{frames}", "frames_mib": mib(frames * height * width * 3)}
    for name, value in (("text_states", states), ("latents", out.latents)):
        t0 = time.perf_counter()
        data = to_bytes(value)
        from_bytes(data)
        result[f"{name}_mib"] = mib(len(data))
        result[f"{name}_to_and_from_bytes_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return result


def wan_shapes() -> list[dict]:
    import torch

    from models.interface import to_bytes

    states = {c: (torch.zeros(1, 512, 4096, dtype=torch.bfloat16),) for c in ("caption", "negative caption")}
    text_mib = mib(len(to_bytes(states)))
    rows = []
    for name, frames, h, w, z, fs, ft in WAN_SIZES:
        latents = torch.zeros(1, z, (frames - 1) // ft + 1, h // fs, w // fs)
        rows.append({"model": name, "text_states_mib": text_mib, "latents_mib": mib(len(to_bytes(latents))),
                     "latent_shape": list(latents.shape), "frames_mib": mib(frames * h * w * 3)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--size", default=None, help="WxHxF (default: the model's default size)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--wan-shapes", action="store_true", help="Wan's hand-off at its real shapes, no checkpoint")
    a = p.parse_args()
    if a.wan_shapes:
        print(json.dumps(wan_shapes(), indent=2))
        return
    from models.interface import describe_model

    _, limits, _ = describe_model(a.model)
    if a.size:
        width, height, frames = (int(v) for v in a.size.lower().split("x"))
    else:
        width, height = limits.default_width, limits.default_height
        frames = limits.frames_at_least(round(limits.default_seconds * limits.default_fps))
    print(json.dumps(measured(a.model, width, height, frames, a.steps), indent=2))


if __name__ == "__main__":
    main()
