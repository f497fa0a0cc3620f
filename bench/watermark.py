"""Watermark figures: detection rate, false positives and PSNR over many clips.

    python bench/watermark.py [--clips 200] [--steps 10] [--threads 1] [--json OUT.json]

* marked: `--clips` renders of the default model (seeded shapes-world captions, sizes cycling over
  64x64, 96x64, 64x96, 128x128, 32x32, 40x56), marked with `embed_watermark`, then detected
  (a) on the raw frames, (b) after `encode_mp4` at CRF 18 (the writer's setting), (c) at CRF 28,
  (d) after CRF 18, a 2x bicubic downscale and another CRF 18 encode. Also natural images from
  scikit-image as 16-frame clips with a slow pan, at 64..1920 px.
* unmarked (false positives): the same renders without the mark (CRF 18 and CRF 28), as many
  procedural shapes-world clips, and the natural clips without the mark.
* PSNR of the marked frames against the unmarked ones (before encoding).

Rates are per clip; scores are the detector's z (threshold `THRESHOLD`). Nothing here asserts:
tests/pipeline/media/test_provenance.py holds the bars.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = [(64, 64), (96, 64), (64, 96), (128, 128), (32, 32), (40, 56)]
NATURAL = [("astronaut", 64, 64), ("coffee", 96, 64), ("chelsea", 128, 128), ("rocket", 256, 144),
           ("camera", 256, 256), ("astronaut", 512, 512), ("coffee", 600, 400), ("chelsea", 1280, 720),
           ("astronaut", 1920, 1080)]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def downscale(frames: np.ndarray) -> np.ndarray:
    from PIL import Image

    t, h, w, _ = frames.shape
    size = (max(2, w // 2 // 2 * 2), max(2, h // 2 // 2 * 2))  # even, so it can be encoded again
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.BICUBIC)) for f in frames])


def natural_clip(name: str, w: int, h: int, frames: int = 16) -> np.ndarray:
    import skimage.data
    from PIL import Image

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    big = np.asarray(Image.fromarray(img[..., :3]).resize((w + frames, h), Image.BICUBIC))
    return np.stack([big[:, i:i + w] for i in range(frames)])  # pans one pixel a frame


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=200)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    from models.interface import RenderRequest, load_generator
    from models.shapes import world as sw
    from pipeline.media.encode import decode_mp4, encode_mp4
    from pipeline.media.watermark import FALSE_POSITIVE_BOUND, THRESHOLD, detect_watermark, embed_watermark

    gen = load_generator("default", num_threads=args.threads)
    steps = args.steps or gen.limits.default_steps
    scenes = sw.sample_scenes(2024, args.clips, include_held_out=True)
    marked_scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    null_scores: dict[str, list[float]] = defaultdict(list)
    psnrs: dict[str, list[float]] = defaultdict(list)

    def score_marked(key: str, clip) -> None:
        """Mark `clip`; record its PSNR and the detector's score raw, at CRF 18 and 28, and
        downscaled by 2 after CRF 18."""
        marked = embed_watermark(clip)
        psnrs[key].append(psnr(marked, clip))
        s = marked_scores[key]
        s["raw"].append(detect_watermark(marked).score)
        crf18 = decode_mp4(encode_mp4(marked, 8))
        s["crf18"].append(detect_watermark(crf18).score)
        s["crf28"].append(detect_watermark(decode_mp4(encode_mp4(marked, 8, crf=28))).score)
        s["down2x"].append(detect_watermark(decode_mp4(encode_mp4(downscale(crf18), 8))).score)

    t0 = time.time()
    render_s = 0.0
    for i, scene in enumerate(scenes):
        w, h = SIZES[i % len(SIZES)]
        size = f"{w}x{h}"
        t = time.time()
        frames = gen.generate([RenderRequest(caption=sw.canonical_caption(scene), width=w, height=h, frames=16, fps=8,
                                             seed=i, steps=steps, guidance=gen.limits.default_guidance)])[0].frames
        render_s += time.time() - t
        score_marked(size, frames)
        null_scores["model crf18"].append(detect_watermark(decode_mp4(encode_mp4(frames, 8))).score)
        null_scores["model crf28"].append(detect_watermark(decode_mp4(encode_mp4(frames, 8, crf=28))).score)
        proc = sw.render_scene(scene, width=w, height=h, frames=16, rng=i)
        null_scores["procedural crf18"].append(detect_watermark(decode_mp4(encode_mp4(proc, 8))).score)
        if (i + 1) % 20 == 0:
            print(f"  {i + 1}/{args.clips} clips, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)

    for name, w, h in NATURAL:
        clip = natural_clip(name, w, h)
        score_marked(f"natural {w}x{h}", clip)
        null_scores["natural crf18"].append(detect_watermark(decode_mp4(encode_mp4(clip, 8))).score)
        null_scores["natural still"].append(detect_watermark(clip[0]).score)

    report: dict = {"clips": args.clips, "steps": steps, "threshold": THRESHOLD,
                    "false_positive_bound": FALSE_POSITIVE_BOUND, "render_s_per_clip": render_s / max(1, args.clips),
                    "marked": {}, "unmarked": {}, "psnr": {}}
    print(f"\nwatermark: {args.clips} default-model renders (16 frames, {steps} steps) + {len(NATURAL)} natural clips; "
          f"threshold z >= {THRESHOLD} (bound on false positives {FALSE_POSITIVE_BOUND:.1e})")
    columns = ("raw", "crf18", "crf28", "down2x+crf18")
    print(f"{'size':18s} {'n':>4s} {'PSNR dB':>12s}  " + "  ".join(f"{c:>20s}" for c in columns))
    print(f"{'':18s} {'':>4s} {'mean (min)':>12s}  " + "  ".join(f"{'rate  mean z (min)':>20s}" for _ in range(4)))
    all_rates, big_rates = defaultdict(list), defaultdict(list)
    for key in [f"{w}x{h}" for w, h in SIZES] + [f"natural {w}x{h}" for _, w, h in NATURAL]:
        if key not in marked_scores:
            continue
        s, p = marked_scores[key], psnrs[key]
        row = {}
        cells = []
        for cond in ("raw", "crf18", "crf28", "down2x"):
            v = np.array(s[cond])
            rate = float(np.mean(v >= THRESHOLD))
            row[cond] = {"rate": rate, "mean": float(v.mean()), "min": float(v.min())}
            if not key.startswith("natural"):
                all_rates[cond].extend((v >= THRESHOLD).tolist())
                if min(int(x) for x in key.split("x")) >= 64:  # a 2x downscale of a smaller clip is not a use
                    big_rates[cond].extend((v >= THRESHOLD).tolist())
            cells.append(f"{rate:5.2f} {v.mean():6.1f} ({v.min():5.1f})")
        report["marked"][key] = row
        report["psnr"][key] = {"mean": float(np.mean(p)), "min": float(np.min(p))}
        print(f"{key:18s} {len(p):4d} {np.mean(p):6.1f} ({np.min(p):4.1f})  " + "  ".join(f"{c:>20s}" for c in cells))
    overall = {cond: float(np.mean(v)) for cond, v in all_rates.items()}
    big = {cond: float(np.mean(v)) for cond, v in big_rates.items()}
    report["marked"]["all model renders"] = overall
    report["marked"]["model renders, short side >= 64"] = big
    print("detection rate, all model renders:        " + ", ".join(f"{c} {r:.3f}" for c, r in overall.items()))
    print("detection rate, renders short side >= 64: " + ", ".join(f"{c} {r:.3f}" for c, r in big.items()))
    print("\nunmarked (false positives):")
    for key, v in null_scores.items():
        v = np.array(v)
        fp = float(np.mean(v >= THRESHOLD))
        report["unmarked"][key] = {"n": int(v.size), "fp_rate": fp, "max": float(v.max()), "std": float(v.std())}
        print(f"  {key:18s} n={v.size:4d} false-positive rate {fp:.3f}  max z {v.max():5.2f}  std {v.std():.2f}")
    print(f"\nrender {report['render_s_per_clip']:.2f} s/clip; total {time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
