"""`reel eval`: render a prompt set and judge the clips by their pixels (docs/SHAPES_WORLD.md).

Two evaluations, both judged by `models.shapes.judge` (background, colour, shape, motion, permanence;
held-in and held-out colour-shape pairs reported apart):

* `evaluate_prompts` (the default of `reel eval`): the whole product. A prompt set of free-form
  user prompts, each with the attributes its writer meant (JSON Lines: {"prompt": ...,
  "shape": ..., "colour": ..., "background": ..., "motion": ...}; an attribute left out or null
  is one the prompt leaves open, and is not judged), goes through `reel render` (manifest → Ray
  Data → recaptioner → model → H.264 MP4); each MP4 is decoded and judged. The shipped set,
  `models/shapes/eval_prompts.jsonl`, was written as users write, before the recaptioner's word lists.
  OUT gets render/ (the run, resumable: a rerun renders nothing twice), clips.parquet (one row
  per prompt: caption, intended and found attributes) and eval.json (the summary).
* `evaluate_scenes`: the model alone. Fresh random scenes (held-in and held-out pairs, in equal
  numbers) are rendered from their canonical captions straight through the generator, with the
  model's default steps and guidance: what the model does with exactly the captions it was
  trained on.

`vae_roundtrip_adherence` judges encode → decode round-trips: the ceiling the autoencoder sets.
`extension_seam` measures how continuous an extended clip is where the new frames meet the input.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from models.shapes import EVAL_PROMPTS
from models.shapes.judge import ATTRIBUTES, JudgeResult, aggregate, is_held_out, judge_clip
from models.shapes.world import VOCABULARY, canonical_caption, render_scene, sample_scenes
from pipeline import storage
from pipeline.errors import UserError, one_line
from pipeline.media.encode import decode_mp4

DEFAULT_PROMPTS = str(EVAL_PROMPTS)


class EvalError(UserError):
    """The prompt set or the options are unusable (one line, says what to fix)."""

    show_type = True


def load_prompt_set(uri: str) -> list[dict[str, Any]]:
    """The prompt set at `uri` (JSON Lines) as dicts with "prompt" and the named attributes."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        raise EvalError(f"prompt set not found: {uri}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{uri} line {n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise EvalError(f"{uri} line {n}: needs a non-empty \"prompt\" string")
        for a in ATTRIBUTES:
            if row.get(a) is not None and row[a] not in VOCABULARY[a]:
                raise EvalError(f"{uri} line {n}: unknown {a} {row[a]!r} (known: {', '.join(VOCABULARY[a])})")
        rows.append({"prompt": row["prompt"], **{a: row.get(a) for a in ATTRIBUTES}})
    if not rows:
        raise EvalError(f"{uri}: no prompts")
    return rows


@dataclass
class PromptEval:
    """Options of `evaluate_prompts`; the render options are those of `reel render`."""

    out: str
    prompts: str = DEFAULT_PROMPTS
    model: str = "default"
    recaptioner: str | None = None
    steps: int | None = None
    guidance: float | None = None
    limit: int | None = None
    address: str | None = None
    replicas: int | None = None
    threads_per_replica: int | None = None
    progress: bool = True
    step_cache: float | None = None


def evaluate_prompts(cfg: PromptEval) -> dict:
    """Render the prompt set through the pipeline and judge every clip; the summary (also in
    OUT/eval.json). Rows that fail to render count as not adherent and are listed."""
    from pipeline.batch.driver import RenderConfig, render_manifest
    from pipeline.batch.manifest import write_manifest
    from pipeline.errors import UsageError

    prompts = load_prompt_set(cfg.prompts)[: cfg.limit]
    rows = []
    for i, p in enumerate(prompts):
        row = {"id": f"p{i:04d}", "prompt": p["prompt"]}
        if cfg.steps is not None:
            row["steps"] = cfg.steps
        if cfg.guidance is not None:
            row["guidance"] = cfg.guidance
        row.update({f"intended_{a}": p[a] for a in ATTRIBUTES})
        rows.append(row)
    manifest, render_out = storage.join(cfg.out, "manifest.parquet"), storage.join(cfg.out, "render")
    write_manifest(rows, manifest)
    t0 = time.perf_counter()
    try:
        run = render_manifest(RenderConfig(manifest=manifest, out=render_out, model=cfg.model,
                                           recaptioner=cfg.recaptioner, address=cfg.address,
                                           replicas=cfg.replicas, threads_per_replica=cfg.threads_per_replica,
                                           progress=cfg.progress, step_cache=cfg.step_cache))
    except UsageError as e:  # a bad model or option: nothing rendered, so leave nothing behind
        storage.delete(manifest)
        raise EvalError(str(e)) from None
    render_seconds = time.perf_counter() - t0
    meta = storage.read_parquet_dataset(storage.join(render_out, "metadata"))
    by_id = {r["id"]: r for r in meta.to_pylist()} if meta is not None else {}

    results, targets, clips = [], [], []
    for row, p in zip(rows, prompts):
        m = by_id.get(row["id"])
        if m is None:
            result = JudgeResult(None, None, None, None, 0.0, {"error": "not rendered"})
        else:
            result = judge_clip(decode_mp4(storage.read_bytes(m["video_uri"])))
        results.append(result)
        targets.append(p)
        clips.append({"id": row["id"], "prompt": p["prompt"], "caption": m["caption"] if m else None,
                      "rendered": m is not None, "held_out": is_held_out(p),
                      **{f"intended_{a}": p[a] for a in ATTRIBUTES},
                      **{f"found_{a}": getattr(result, a) for a in ATTRIBUTES},
                      "visible_frames": result.visible_frames})
    summary = aggregate(results, targets)
    summary.update(prompts=cfg.prompts, model=cfg.model, rendered=sum(c["rendered"] for c in clips),
                   failed=[{"id": e.id, "reason": e.reason} for e in run.errors],
                   render_seconds=round(render_seconds, 1), run_id=run.run_id, options=asdict(cfg))
    storage.write_parquet_atomic(storage.join(cfg.out, "clips.parquet"), pa.Table.from_pylist(clips))
    storage.write_json_atomic(storage.join(cfg.out, "eval.json"), summary)
    return summary


def evaluate_scenes(model: str = "default", clips: int = 100, seed: int = 12345, steps: int | None = None,
                    guidance: float | None = None, width: int = 64, height: int = 64, frames: int = 16,
                    fps: int = 8, threads: int | None = None, progress: bool = False,
                    step_cache: float | None = None) -> dict:
    """Judge the model on `clips` fresh held-in and `clips` fresh held-out scenes, rendered from
    their canonical captions straight through the generator (the model's default steps and
    guidance unless given; `step_cache`: its threshold): the judge's summary plus render timings
    (the whole render and its sampling alone) and, with the cache, the mean steps computed."""
    from models.interface import RenderRequest, load_generator

    try:
        gen = load_generator(model, num_threads=threads)
    except (ValueError, OSError) as e:  # ConfigError / WeightsError are ValueErrors
        raise EvalError(f"cannot load model {model!r}: {one_line(e)}") from None
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, clips, include_held_out=False) + sample_scenes(rng, clips, held_out_only=True)
    seeds = rng.integers(0, 2 ** 31 - 1, size=len(scenes))
    results, seconds, sampling, computed = [], [], [], []
    for i, (scene, s) in enumerate(zip(scenes, seeds)):
        req = RenderRequest(caption=canonical_caption(scene), width=width, height=height, frames=frames, fps=fps,
                            seed=int(s), steps=steps or gen.limits.default_steps,
                            guidance=gen.limits.default_guidance if guidance is None else guidance,
                            step_cache=step_cache)
        t0 = time.perf_counter()
        [out] = gen.generate([req])
        seconds.append(time.perf_counter() - t0)
        sampling.append(out.timings["sample"])
        computed += [out.steps_computed] if out.steps_computed is not None else []
        results.append(judge_clip(out.frames))
        if progress:
            print(f"\rscenes {i + 1}/{len(scenes)}", end="", flush=True)
    if progress:
        print(flush=True)
    summary = aggregate(results, scenes)
    summary["render_seconds"] = {"mean": float(np.mean(seconds)), "median": float(np.median(seconds)),
                                 "max": float(np.max(seconds))}
    summary["sample_seconds"] = {"mean": float(np.mean(sampling)), "median": float(np.median(sampling))}
    if computed:
        summary["steps_computed"] = {"mean": float(np.mean(computed)), "min": min(computed), "max": max(computed)}
    summary["model"] = {"name": gen.info.name, "version": gen.info.version, "weights_sha256": gen.info.weights_sha256}
    summary["options"] = {"clips": clips, "seed": seed, "steps": steps or gen.limits.default_steps,
                          "guidance": gen.limits.default_guidance if guidance is None else guidance,
                          "width": width, "height": height, "frames": frames, "fps": fps, "step_cache": step_cache}
    return summary


def vae_roundtrip_adherence(vae, clips: int = 64, seed: int = 777, held_out: bool = True) -> dict:
    """Judge VAE round-trips (encode → decode) of fresh scenes: do the attributes survive the
    autoencoder? `held_out` scenes by default (pairs the VAE never saw)."""
    import torch

    from models.training.data import to_tensor

    rng = np.random.default_rng(seed)
    scenes = sample_scenes(rng, clips, held_out_only=held_out)
    results, err = [], []
    with torch.no_grad():
        for scene in scenes:
            clip = render_scene(scene, rng=rng)
            x = to_tensor(clip[None])
            y = vae.decode(vae.encode(x)).clamp(-1, 1)
            err.append(float((y - x).abs().mean()) * 127.5)
            frames = ((y[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
            results.append(judge_clip(frames))
    summary = aggregate(results, scenes)
    summary["mean_abs_error_255"] = float(np.mean(err))
    return summary


def extension_seam(source: np.ndarray, new: np.ndarray, direction: str = "forward") -> float:
    """The seam of an extension, as a multiple of the source's own largest step.

    `source` (T×H×W×3 uint8) is the clip that was extended and `new` the generated frames only
    (forward: they follow the source; backward: they precede it). The seam is the mean absolute
    difference (of 255) between the new frame next to the source and the source frame it meets;
    it is divided by the largest mean absolute difference between neighbouring source frames.
    At most 1: the clip steps over the seam no more than the source steps from frame to frame
    (the generation-modes bar).
    """
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction must be forward or backward, got {direction!r}")
    if len(source) < 2 or len(new) < 1:
        raise ValueError("an extension seam needs a source of 2 or more frames and 1 or more new frames")

    def step(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())

    largest = max(step(source[i], source[i + 1]) for i in range(len(source) - 1))
    seam = step(new[0], source[-1]) if direction == "forward" else step(new[-1], source[0])
    return seam / max(largest, 1e-9)


def format_summary(summary: dict) -> str:
    """A short table of a summary: adherence per attribute, all / held-in / held-out."""
    header = f"{'':10} {'clips':>5} {'adher.':>6} {'all4':>5} {'perm.':>5}  "
    lines = [header + " ".join(f"{a:>10}" for a in ATTRIBUTES)]
    parts = (("all", summary), ("held-in", summary.get("held_in", {})), ("held-out", summary.get("held_out", {})))
    for name, part in parts:
        if not part.get("clips"):
            continue
        attrs = " ".join(f"{part['attributes'][a]:>10.3f}" if a in part["attributes"] else f"{'-':>10}"
                         for a in ATTRIBUTES)
        lines.append(f"{name:10} {part['clips']:>5} {part['adherence']:>6.3f} {part['all_attributes']:>5.2f} "
                     f"{part['permanence']:>5.3f}  {attrs}")
    return "\n".join(lines)


__all__ = ["DEFAULT_PROMPTS", "EvalError", "PromptEval", "evaluate_prompts", "evaluate_scenes", "format_summary",
           "load_prompt_set", "vae_roundtrip_adherence"]
