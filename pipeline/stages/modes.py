"""The generation modes as render requests: what each mode gives the generator and how its frames
become the output clip.

Every mode is text→video with some frames given (frame conditioning) or a video to start from
(remix), so one generator call does them all:

    t2v          nothing given
    image        one latent frame's worth sampled; its first frame is the still
    i2v          the image is frame 0
    extend       forward: the input's last frames open the request, the new part follows; the output
                 is the input plus the new part (`extension_only`: the new part alone); backward: the
                 input's first frames close the request and the new part comes before them (a model
                 that takes given frames only at a request's ends, `GridLimits.cond_at_ends`: one frame
                 of context, and backward a forward render from the first frame played in reverse)
    interpolate  two keyframes: the first and the last frame; two clips: the end of the first opens
                 the request, the start of the second closes it, the gap is sampled between them
    remix        the input clip noised to t = strength, then sampled with the new caption (SDEdit)
    storyboard   shot 1 as text→video, each later shot a forward extension of the clip so far with
                 its own caption; the context frames carry the subject and style across the cut

`load_inputs` (a CPU stage) reads a row's pictures and clips and fits them to the row's size;
`render_clip` (the render stage) turns the row and its inputs into frames.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

import numpy as np

from models.interface import GridLimits, LoraAdapter, RenderRequest, VideoGenerator
from pipeline.media.decode import MediaError, fit_frame, load_image, load_video, probe_video, read_input
from pipeline.stages.base import optional_number


def load_inputs(row: dict[str, Any], limits: GridLimits) -> dict[str, np.ndarray]:
    """The row's media fitted to its size (uint8 arrays by column name). A row that gives no size
    takes its first input's, snapped to the model's grid; `row` width/height are set then."""
    columns = [c for c in ("image", "image_end", "video", "video_end") if row.get(c)]
    if not columns:
        return {}
    images = {c: load_image(row[c], c) for c in columns if c.startswith("image")}
    videos = {c: read_input(row[c], c) for c in columns if c.startswith("video")}
    if not int(row.get("width") or 0):
        first = columns[0]
        if first in images:
            w, h = images[first].shape[1], images[first].shape[0]
        else:
            w, h = probe_video(videos[first], first, row[first])[:2]
        row["width"], row["height"] = limits.fit_size(w, h)
    width, height, fps = int(row["width"]), int(row["height"]), int(row["fps"])
    out = {c: fit_frame(im, width, height)[None] for c, im in images.items()}
    for c, data in videos.items():
        out[c] = load_video(row[c], fps, width, height, c, data=data)
    if row["mode"] == "remix" and len(out["video"]) > limits.max_frames:
        raise MediaError(f"video: {row['video']} is {len(out['video'])} frames at {fps} fps; remix takes up to "
                         f"{limits.max_frames} ({limits.max_frames / fps:g} s); trim it or lower fps")
    return out


def inputs_bytes(inputs: dict[str, np.ndarray]) -> bytes:
    """Inputs as one .npz blob, to travel in a Ray Data row."""
    if not inputs:
        return b""
    buf = io.BytesIO()
    np.savez(buf, **inputs)
    return buf.getvalue()


def inputs_from_bytes(data: bytes | None) -> dict[str, np.ndarray]:
    if not data:
        return {}
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


def base_request(row: dict[str, Any]) -> RenderRequest:
    """A validated row's request as text→video (the modes add their given frames to it)."""
    return RenderRequest(
        caption=row["caption"], negative_caption=row.get("negative_prompt") or "",
        width=int(row["width"]), height=int(row["height"]), frames=int(row["frames"]), fps=int(row["fps"]),
        seed=int(row["seed"]), steps=int(row["steps"]), guidance=float(row["guidance"]),
        lora=row_adapters(row), step_cache=optional_number(row.get("step_cache")))


def single_request(row: dict[str, Any], inputs: dict[str, np.ndarray], limits: GridLimits,
                   base: RenderRequest | None = None) -> RenderRequest | None:
    """The one request a row's clip is, where its frames are that request's (`single_request_frames`):
    text→video, a still, image→video, interpolation between two pictures. None for the modes that render
    several requests or join given frames to the new ones (extension, interpolation between clips, remix,
    storyboards). `base`: the row's `base_request`, where the caller has it."""
    base = base or base_request(row)
    mode = row["mode"]
    if mode == "t2v":
        return base
    if mode == "image":
        return replace(base, frames=limits.min_frames)
    if mode == "i2v":
        return replace(base, cond_frames=inputs["image"], cond_index=(0,))
    if mode == "interpolate" and "image" in inputs:
        ends = np.concatenate([inputs["image"], inputs["image_end"]])
        return replace(base, cond_frames=ends, cond_index=(0, base.frames - 1))
    return None


def single_request_frames(row: dict[str, Any], frames: np.ndarray) -> np.ndarray:
    """The clip of a row from its `single_request`'s frames (a still keeps the first)."""
    return frames[:1] if row["mode"] == "image" else frames


def render_clip(generator: VideoGenerator, row: dict[str, Any], inputs: dict[str, np.ndarray],
                text_states: dict | None = None
                ) -> tuple[np.ndarray, dict[str, float], list[dict[str, Any]], int | None]:
    """(frames uint8 T×H×W×3, seconds per stage, per-shot records, steps computed with the step cache or
    None) of one validated row. `text_states`: its captions' states, handed over by a text stage
    (`models/handoff.py`), for a generator loaded without its text encoder."""
    limits = generator.limits
    base = base_request(row)
    timings: dict[str, float] = {}
    shots: list[dict[str, Any]] = []
    computed: list[int] = []

    def run(request: RenderRequest) -> np.ndarray:
        out = generator.generate([request], text_states=text_states)[0]
        for k, v in out.timings.items():
            timings[k] = timings.get(k, 0.0) + v
        if out.steps_computed is not None:
            computed.append(out.steps_computed)
        return out.frames

    mode = row["mode"]
    single = single_request(row, inputs, limits, base)
    if single is not None:
        frames = single_request_frames(row, run(single))
    elif mode == "interpolate":
        first, last = inputs["video"], inputs["video_end"]
        gap = _between(run, base, limits, first, last)
        frames = np.concatenate([first, gap, last])
    elif mode == "extend":
        video = inputs["video"]
        if row.get("direction") == "backward":
            new = _between(run, base, limits, None, video)
            frames = new if row.get("extension_only") else np.concatenate([new, video])
        else:
            new = _between(run, base, limits, video, None)
            frames = new if row.get("extension_only") else np.concatenate([video, new])
    elif mode == "remix":
        frames = _remix(run, base, limits, inputs["video"], float(row["strength"]))
    elif mode == "storyboard":
        frames, shots = _storyboard(run, base, limits, row)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return frames, timings, shots, sum(computed) if computed else None


def row_captions(row: dict[str, Any]) -> list[str]:
    """Every caption a row's requests carry: its caption (or each shot's), and its negative caption."""
    shots = json.loads(row.get("shot_captions") or "[]") if row["mode"] == "storyboard" else []
    return [*(shots or [row["caption"]]), row.get("negative_prompt") or ""]


def row_adapters(row: dict[str, Any]) -> tuple[LoraAdapter, ...]:
    """The LoRA adapters a row applies (its `lora`: JSON text [{uri, scale}], "" for none)."""
    return tuple(LoraAdapter(a["uri"], float(a["scale"])) for a in json.loads(row.get("lora") or "[]"))


def _between(run, base: RenderRequest, limits: GridLimits, before: np.ndarray | None,
             after: np.ndarray | None) -> np.ndarray:
    """`base.frames` new frames after the end of `before` and/or before the start of `after`,
    conditioned on up to `context_frames` of each; returns the new frames only.

    The context before is padded at its start to a clip of its own on the model's grid (whole
    latent frames), the context after at its end to whole frame steps, and the request to an
    allowed length (`GridLimits.frames_at_least`); frames past the given ones are sampled freely.
    A model that takes given frames only at a request's ends: `_between_ends`."""
    if limits.cond_at_ends and after is not None:
        return _between_ends(run, base, limits, before, after)
    # a model that takes given frames only at a request's ends carries one frame across the seam
    fm = limits.frame_multiple
    ctx = 1 if limits.cond_at_ends else limits.context_frames or fm
    head = before[-ctx:] if before is not None else before
    tail = after[:ctx] if after is not None else after
    pre = limits.frames_at_least(len(head)) if head is not None else 0
    post = -(-len(tail) // fm) * fm if tail is not None else 0
    n = limits.frames_at_least(pre + base.frames + post)
    if n > limits.max_frames:
        raise ValueError(f"the new part with its {pre + post} context frames is {n} frames; the model's "
                         f"maximum is {limits.max_frames}: ask for fewer seconds")
    known, index = [], []
    if head is not None:  # the last given frame sits right before the new part
        known.append(head)
        index += range(pre - len(head), pre)
    if tail is not None:
        known.append(tail)
        index += range(pre + base.frames, pre + base.frames + len(tail))
    frames = run(replace(base, frames=n, cond_frames=np.concatenate(known), cond_index=tuple(index)))
    return frames[pre:pre + base.frames]


def _between_ends(run, base: RenderRequest, limits: GridLimits, before: np.ndarray | None,
                  after: np.ndarray) -> np.ndarray:
    """`_between` on a model that takes given frames only as a request's first and last frame (an
    image-to-video Wan checkpoint; `_between` carries one frame across the seam, so a forward extension is its
    own: the clip's last frame opens the request). Between two clips: the first's last frame opens the
    request, the second's first frame closes it (first-and-last-frame conditioning), and the new part is
    the frames between, `base.frames` rounded up to the grid less the two ends (so up to 3 frames more
    than asked). Before a clip (a backward extension, where no model here takes a last frame alone): the
    clip's first frame opens a request sampled forward and the new part is played in reverse, so it ends
    on that frame; its motion runs backward in time (docs/MODELS.md argues the choice)."""
    if before is None:
        return _between(run, base, limits, after[:1], None)[::-1]
    n = limits.frames_at_least(base.frames + 2)
    if n > limits.max_frames:
        raise ValueError(f"the gap with its 2 end frames is {n} frames; the model's maximum is {limits.max_frames}: "
                         f"ask for fewer seconds")
    ends = np.concatenate([before[-1:], after[:1]])
    return run(replace(base, frames=n, cond_frames=ends, cond_index=(0, n - 1)))[1:n - 1]


def _remix(run, base: RenderRequest, limits: GridLimits, video: np.ndarray, strength: float) -> np.ndarray:
    """The video re-sampled from noise level `strength` under the row's caption (same length)."""
    n = len(video)
    padded = limits.frames_at_least(n)  # the last frame repeated up to a length the model encodes
    init = np.concatenate([video, np.repeat(video[-1:], padded - n, axis=0)]) if padded > n else video
    return run(replace(base, frames=padded, init_frames=init, strength=strength))[:n]


def _storyboard(run, base: RenderRequest, limits: GridLimits, row: dict[str, Any]
                ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    shots = json.loads(row["shots"])
    captions = json.loads(row.get("shot_captions") or "[]")
    if len(captions) != len(shots):
        raise ValueError(f"storyboard has {len(shots)} shots but {len(captions)} captions")
    clip: np.ndarray | None = None
    records = []
    for k, ((prompt, frames), caption) in enumerate(zip(shots, captions)):
        shot = replace(base, caption=caption, frames=int(frames), seed=(base.seed + k) % 2**32)
        new = run(shot) if clip is None else _between(run, shot, limits, clip, None)
        start = 0 if clip is None else len(clip)
        clip = new if clip is None else np.concatenate([clip, new])
        records.append({"prompt": prompt, "caption": caption, "start_frame": start, "frames": int(frames),
                        "seconds": int(frames) / base.fps, "seed": shot.seed})
    return clip, records
