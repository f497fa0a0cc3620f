"""How continuous extensions are, over many clips: the seam figure of the generation-modes work.

    python bench/extension_seam.py [--model default | <Wan folder>] [--clips 16] [--seed 0] [--threads 2] [--raw]
                                   [--steps N]

For each of `--clips` fresh shapes-world scenes (held-in pairs, every motion but "still", whose
source has no frame-to-frame step to measure against), 8 frames of a 2 s clip of the scene are
extended by 1 s forward and 1 s backward through the batch pipeline's own mode code
(`pipeline.stages.modes.render_clip`), with the model's default steps and guidance:

  model  the model's own render of the scene's canonical caption (extending a generated clip):
         its middle second, frames 4-11, both ways (the object is mid-motion);
  world  the shapes world's render of the scene, which has a true continuation to compare with:
         frames 4-11 forward, frames 8-15 backward (so the frames before it exist).

The input goes through H.264 first, as a user's MP4 would (`--raw`: it does not). The seam is
`pipeline.evaluate.extension_seam`: the step over the seam as a multiple of the input's largest
frame-to-frame step; the bar of the generation-modes issue is at most 1. Two references put the
model's figure in context, both on the world input:

  truth        the world's own next (previous) frame: what a perfect extension would show;
  autoencoder  that frame decoded from the true clip's own latents (at the place in its 4-frame
               group where an extension's seam frame falls): a perfect DiT with this decoder.

Prints one JSON line per clip, then the summary: median, max and the share at or under 1, per
series and direction.

On a Wan folder (`--model <folder>`: one that renders `extend`, an image-to-video checkpoint) the same
figures, with Wan's grid: 17-frame model clips (4k+1) whose frames 4-11 are extended by 9 frames (1 s at
8 fps, the nearest 4k+1); the model series only where the folder renders text→video (TI2V-5B); the
autoencoder reference is the world clip's first 13 frames through the folder's VAE (encoded, the mode,
decoded). `--steps` overrides the model's default steps (a tiny random folder: few steps suffice).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

SERIES = ("model", "world", "truth", "autoencoder")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and the renders")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--raw", action="store_true", help="extend the frames themselves, not their H.264 round trip")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    a = p.parse_args()

    import numpy as np

    from models.interface import RenderRequest, is_wan_folder, load_generator
    from models.shapes.world import canonical_caption, render_scene, sample_scenes
    from pipeline.evaluate import extension_seam
    from pipeline.media.encode import decode_mp4, encode_mp4
    from pipeline.stages.modes import render_clip

    gen = load_generator(a.model, device="cpu", num_threads=a.threads)
    lim = gen.limits
    wan = is_wan_folder(a.model)
    steps = a.steps or lim.default_steps
    model_frames = 17 if wan else 16  # Wan's grid is 4k+1
    with_model = "t2v" in lim.modes
    rng = np.random.default_rng(a.seed)
    scenes = [s for s in sample_scenes(rng, 4 * a.clips) if s.motion != "still"][:a.clips]
    seams: dict[str, list[float]] = {f"{s} {d}": [] for s in SERIES for d in ("forward", "backward")}

    def add(row: dict, key: str, value: float) -> None:
        seams[key].append(value)
        row[key] = round(value, 3)

    for k, scene in enumerate(scenes):
        caption = canonical_caption(scene)
        clips = {"world": render_scene(scene, rng=a.seed + k)}
        if with_model:
            clips["model"] = gen.generate([RenderRequest(caption, 64, 64, model_frames, 8, a.seed + k, steps=steps,
                                                         guidance=lim.default_guidance)])[0].frames
        as_given = (lambda frames: frames) if a.raw else (lambda frames: decode_mp4(encode_mp4(frames, 8)))
        inputs = {("world", "forward"): as_given(clips["world"][4:12]),
                  ("world", "backward"): as_given(clips["world"][8:16])}
        if with_model:
            middle = as_given(clips["model"][4:12])
            inputs |= {("model", "forward"): middle, ("model", "backward"): middle}
        row = {"clip": k, "caption": caption}
        request = {"caption": caption, "width": 64, "height": 64, "frames": lim.frames_for(1.0, 8), "fps": 8,
                   "seed": a.seed + k, "steps": steps, "guidance": lim.default_guidance, "mode": "extend"}
        for (name, direction), video in inputs.items():
            out, _, _ = render_clip(gen, dict(request, direction=direction), {"video": video})
            new = out[len(video):] if direction == "forward" else out[:len(out) - len(video)]
            add(row, f"{name} {direction}", extension_seam(video, new, direction))
        world = clips["world"]
        if wan:
            decoded = wan_autoencoded(gen, world[:13])
        else:
            from models.generator import pixels_to_video  # the default model's own (not on the seam)

            decoded = gen.decode_frames(gen.vae.encode(pixels_to_video(world, gen.device)).float())
        for name, frames in (("truth", world), ("autoencoder", decoded)):
            add(row, f"{name} forward", extension_seam(inputs["world", "forward"], frames[12:13], "forward"))
            add(row, f"{name} backward", extension_seam(inputs["world", "backward"], frames[7:8], "backward"))
        print(json.dumps(row), flush=True)
    summary = {"model": f"{gen.info.name} {gen.info.version}", "clips": len(scenes),
               "input": "raw" if a.raw else "h264"}
    for key, values in seams.items():
        if not values:  # the model series on a folder that renders no text→video
            continue
        summary[key] = {"median": round(statistics.median(values), 3), "max": round(max(values), 3),
                        "share_at_most_1": round(sum(v <= 1 for v in values) / len(values), 3)}
    print(json.dumps(summary), flush=True)


def wan_autoencoded(gen, frames):
    """uint8 frames (4k+1 of them) through a Wan generator's VAE: preprocessed as diffusers does, encoded (the
    latent distribution's mode), normalised, then the generator's own decode."""
    import torch

    with torch.inference_mode():
        video = gen.video_processor.preprocess_video(frames.astype("float32") / 255.0, height=frames.shape[1],
                                                     width=frames.shape[2]).to(gen.device)
        return gen.decode(gen.encode_latents(video))


if __name__ == "__main__":
    main()
