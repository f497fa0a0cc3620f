"""How continuous extensions are, over many clips: the seam figure of the generation-modes work.

    python bench/extension_seam.py [--model default] [--clips 16] [--seed 0] [--threads 2]

For each of `--clips` fresh shapes-world scenes (held-in pairs, every motion but "still", whose
source has no frame-to-frame step to measure against): a 2 s clip is rendered from its canonical
caption, its middle second (frames 4-11, so the object is mid-motion) goes through H.264 as the
input, and that input is extended by 1 s forward and 1 s backward through the batch pipeline's
own mode code (`pipeline.modes.render_clip`), with the model's default steps and guidance. The
seam is `pipeline.evaluate.extension_seam`: the step over the seam as a multiple of the input's
largest frame-to-frame step. The bar of the generation-modes issue is at most 1.

Prints one JSON line per clip, then the summary: median, max and the share at or under 1, per
direction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and the renders")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = p.parse_args()

    import numpy as np

    from models.generator import load_generator
    from models.interface import RenderRequest
    from pipeline.encode import decode_mp4, encode_mp4
    from pipeline.evaluate import extension_seam
    from pipeline.modes import render_clip
    from pipeline.shapes_world import canonical_caption, sample_scenes

    gen = load_generator(a.model, device="cpu", num_threads=a.threads)
    lim = gen.limits
    rng = np.random.default_rng(a.seed)
    scenes = [s for s in sample_scenes(rng, 4 * a.clips) if s.motion != "still"][:a.clips]
    seams: dict[str, list[float]] = {"forward": [], "backward": []}
    for k, scene in enumerate(scenes):
        caption = canonical_caption(scene)
        source = gen.generate([RenderRequest(caption, 64, 64, 16, 8, a.seed + k, steps=lim.default_steps,
                                             guidance=lim.default_guidance)])[0].frames
        video = decode_mp4(encode_mp4(source[4:12], 8))
        row = {"clip": k, "caption": caption}
        request = {"caption": caption, "width": 64, "height": 64, "frames": 8, "fps": 8, "seed": a.seed + k,
                   "steps": lim.default_steps, "guidance": lim.default_guidance, "mode": "extend"}
        for direction in seams:
            out, _, _ = render_clip(gen, dict(request, direction=direction), {"video": video})
            new = out[len(video):] if direction == "forward" else out[:len(out) - len(video)]
            seams[direction].append(extension_seam(video, new, direction))
            row[direction] = round(seams[direction][-1], 3)
        print(json.dumps(row), flush=True)
    summary = {"model": f"{gen.info.name} {gen.info.version}", "clips": len(scenes)}
    for direction, values in seams.items():
        summary[direction] = {"median": round(statistics.median(values), 3), "max": round(max(values), 3),
                              "share_at_most_1": round(sum(v <= 1 for v in values) / len(values), 3)}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
