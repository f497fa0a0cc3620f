"""Campaigns: a YAML spec of ad variants expanded into a render manifest.

    campaign: spring-sale                 # names the ids: spring-sale-3f9c0a1b2d4e
    template: "A {style} shot of {product} {setting}. {cta}"
    negative_prompt: "blurry, text artifacts"   # optional, may use the same {variables}
    axes:                                 # variant axes: every value is a string
      product: [trail sneakers, city backpack]
      setting: [on a mountain ridge at dawn, in a rainy street at night]
      style: [cinematic, hand-drawn]
      cta: [Shop now., Limited drop.]
    placements:                           # each variant renders once per placement
      - {name: story, aspect: "9:16", seconds: 6}
      - {name: feed, aspect: "1:1", seconds: 10, fps: 4}
      - {name: banner, width: 128, height: 72, seconds: 4}
    seeds: 2                              # per variant and placement: a count, or a list of ints
    exclude:                              # optional: drop variants matching every key of an entry
      - {product: city backpack, setting: on a mountain ridge at dawn}
    steps: 20                             # optional: steps, guidance, fps for every row
    model: default                        # optional: the model whose grid the placements map to

`expand(spec)` gives one manifest row per (variant, placement, seed): the prompt filled from the
template, the placement's width/height/seconds/fps, the seed, and the axes, the placement and the
campaign as pass-through columns. A row's id hashes the values that make it (axis values,
placement name, seed) — not the template or the order of the spec — so re-expanding a campaign,
or growing it, maps every existing variant to the same id and a rerun renders nothing twice.

An aspect ratio maps to the width/height on the model's grid (multiples of `size_multiple`,
within `min_size`..`max_size` and `max_pixels`) whose ratio is nearest, at about the model's
default pixel count. A malformed spec raises `CampaignError` naming the file and line.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any

import yaml

from models.interface import GridLimits
from pipeline.batch.manifest import ID_PATTERN, KNOWN_COLUMNS
from pipeline.errors import UserError, one_line

TOP_KEYS = ("campaign", "template", "negative_prompt", "axes", "placements", "seeds", "exclude",
            "steps", "guidance", "fps", "model", "description")
PLACEMENT_KEYS = ("name", "aspect", "width", "height", "seconds", "fps")
#: Pass-through columns every row carries besides the axes.
CAMPAIGN_COLUMNS = ("campaign", "placement", "aspect", "variant")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_AXIS = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_ASPECT = re.compile(r"\s*(\d+(?:\.\d+)?)\s*[:x/]\s*(\d+(?:\.\d+)?)\s*")
MAX_SEEDS = 64


class CampaignError(UserError):
    """A campaign spec that cannot be expanded; the message is one line naming the file and line."""

    show_type = True


# --------------------------------------------------------------------------------------------
# YAML with line numbers


class _Map(dict):
    line: int = 0
    key_lines: dict
    raw: dict


class _Seq(list):
    line: int = 0
    item_lines: list


class _Loader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences remember the line of each entry (1-based), and the
    raw text of scalar values (`9:16` is a base-60 integer to YAML 1.1; an aspect wants the text)."""


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line, out.key_lines, out.raw = node.start_mark.line + 1, {}, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
        if key in out:
            raise CampaignError(f"{key_node.start_mark.line + 1}: duplicate key {key!r}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.ScalarNode):
            out.raw[key] = value_node.value
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(n, deep=True) for n in node.value)
    out.line, out.item_lines = node.start_mark.line + 1, [n.start_mark.line + 1 for n in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


# --------------------------------------------------------------------------------------------
# The spec


@dataclass(frozen=True)
class Placement:
    name: str
    width: int
    height: int
    seconds: float
    fps: int
    aspect: str  # "9:16" as written, or "WxH" for an explicit size


@dataclass
class CampaignSpec:
    name: str
    template: str
    negative_prompt: str
    axes: dict[str, list[str]]
    placements: list[Placement]
    seeds: list[int] | int  # explicit seeds, or how many to derive per variant
    exclude: list[dict[str, set[str]]]
    steps: int | None = None
    guidance: float | None = None
    model: str | None = None
    source: str = "<spec>"
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def variant_count(self) -> int:
        return sum(1 for _ in _variants(self))


def load_spec(text_or_path: str, *, model: str | None = None, source: str | None = None,
              limits: GridLimits | None = None) -> CampaignSpec:
    """Parse and check a campaign spec (YAML text, or a path/URI ending in .yaml/.yml).

    `model` overrides the spec's own `model:` (default "default"); its GridLimits decide the
    placements' sizes and the longest allowed duration (or pass `limits` directly).
    """
    if "\n" not in text_or_path and text_or_path.endswith((".yaml", ".yml")):
        from pipeline import storage

        source = source or text_or_path
        try:
            text = storage.read_bytes(text_or_path).decode("utf-8")
        except FileNotFoundError:
            raise CampaignError(f"{source}: campaign spec not found") from None
        except Exception as e:
            reason = one_line(e, limit=None, show_type=False)
            raise CampaignError(f"{source}: cannot read campaign spec: {reason}") from None
    else:
        text = text_or_path
    source = source or "<spec>"
    try:
        doc = yaml.load(io.StringIO(text), Loader=_Loader)
    except CampaignError as e:
        raise CampaignError(f"{source}:{e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f"{mark.line + 1}:" if mark else ""
        raise CampaignError(f"{source}:{line} not valid YAML: {e.problem or e.context}") from None
    return _check(doc, source, model, limits)


def _check(doc: Any, source: str, model: str | None, limits: GridLimits | None) -> CampaignSpec:
    def fail(line: int, msg: str) -> CampaignError:
        return CampaignError(f"{source}:{line}: {msg}")

    if not isinstance(doc, _Map):
        raise CampaignError(f"{source}:1: a campaign spec is a YAML mapping (campaign, template, axes, placements, …)")
    for key in doc:
        if key not in TOP_KEYS:
            raise fail(doc.key_lines[key], f"unknown key {key!r} (known: {', '.join(TOP_KEYS)})")
    for key in ("campaign", "template", "axes", "placements"):
        if key not in doc:
            raise fail(doc.line, f"missing required key {key!r}")
    line = doc.key_lines.get

    name = doc["campaign"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise fail(line("campaign"), f"campaign name {name!r} must match {_NAME.pattern} (it starts every id)")

    # Axes: a mapping of name → non-empty list of distinct scalar values (kept as strings).
    axes_node = doc["axes"]
    if not isinstance(axes_node, _Map) or not axes_node:
        raise fail(line("axes"), "axes must be a mapping of axis name → list of values, with at least one axis")
    axes: dict[str, list[str]] = {}
    for axis, values in axes_node.items():
        at = axes_node.key_lines[axis]
        if not _AXIS.fullmatch(axis):
            raise fail(at, f"axis name {axis!r} must be an identifier ({_AXIS.pattern}) to be usable as {{{axis}}}")
        if axis in KNOWN_COLUMNS or axis in CAMPAIGN_COLUMNS:
            raise fail(at, f"axis name {axis!r} clashes with a manifest column; rename it")
        if not isinstance(values, list):
            raise fail(at, f"axis {axis!r} must be a list of values")
        if not values:
            raise fail(at, f"axis {axis!r} is empty: give it at least one value")
        out = []
        for i, v in enumerate(values):
            if v is None or isinstance(v, (dict, list)):
                raise fail(values.item_lines[i],
                           f"axis {axis!r} value {i + 1} must be a string or number, got {_kind(v)}")
            s = _scalar_text(v)
            if s in out:
                raise fail(values.item_lines[i], f"axis {axis!r} lists {s!r} twice")
            out.append(s)
        axes[axis] = out

    template = _template(doc, "template", axes, fail, required=True)
    negative = _template(doc, "negative_prompt", axes, fail, required=False)

    if limits is None:
        from models.interface import describe_model

        model_name = model or doc.get("model") or "default"
        try:
            _, limits, _ = describe_model(model_name)
        except Exception as e:
            reason = one_line(e, limit=None, show_type=False)
            raise CampaignError(f"{source}: cannot load model {model_name!r}: {reason}") from None

    fps_default = _int(doc, "fps", fail, lo=limits.min_fps, hi=limits.max_fps) if "fps" in doc else limits.default_fps
    steps = _int(doc, "steps", fail, lo=1, hi=limits.max_steps) if "steps" in doc else None
    guidance = None
    if "guidance" in doc:
        g = doc["guidance"]
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (g >= 0 and math.isfinite(g)):
            raise fail(line("guidance"), f"guidance must be a number >= 0, got {g!r}")
        guidance = float(g)

    placements = _placements(doc, limits, fps_default, fail)
    seeds = _seeds(doc, fail)
    exclude = _exclusions(doc, axes, fail)

    spec = CampaignSpec(name=name, template=template, negative_prompt=negative, axes=axes,
                        placements=placements, seeds=seeds, exclude=exclude, steps=steps,
                        guidance=guidance, model=model or doc.get("model"), source=source, raw=dict(doc))
    if not any(True for _ in _variants(spec)):
        raise fail(line("exclude"), "the exclusions remove every variant")
    return spec


def _template(doc: _Map, key: str, axes: dict[str, list[str]], fail, *, required: bool) -> str:
    if key not in doc:
        return ""
    value, at = doc[key], doc.key_lines[key]
    if not isinstance(value, str) or (required and not value.strip()):
        raise fail(at, f"{key} must be a non-empty string")
    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(value) if f is not None]
    except ValueError as e:
        raise fail(at, f"{key} is not a valid template: {e} (write {{{{ and }}}} for literal braces)") from None
    for f in fields:
        if not f:
            raise fail(at, f"{key} has an empty {{}}: name an axis, e.g. {{{next(iter(axes))}}}")
        if f not in axes:
            raise fail(at, f"{key} uses unknown variable {{{f}}} (axes: {', '.join(axes)})")
    return value


def _placements(doc: _Map, limits: GridLimits, fps_default: int, fail) -> list[Placement]:
    node, at = doc["placements"], doc.key_lines["placements"]
    if not isinstance(node, _Seq) or not node:
        raise fail(at, "placements must be a non-empty list, e.g. - {aspect: \"9:16\", seconds: 6}")
    out: list[Placement] = []
    for i, p in enumerate(node):
        pline = node.item_lines[i]
        if not isinstance(p, _Map):
            raise fail(pline, f"placement {i + 1} must be a mapping with aspect (or width and height) and seconds")
        for key in p:
            if key not in PLACEMENT_KEYS:
                raise fail(p.key_lines[key],
                           f"placement {i + 1}: unknown key {key!r} (known: {', '.join(PLACEMENT_KEYS)})")

        def kline(k, p=p, pline=pline):
            return p.key_lines.get(k, pline)

        label = f"placement {p.get('name', i + 1)!s}"
        if "aspect" in p and ("width" in p or "height" in p):
            raise fail(kline("aspect"), f"{label}: give aspect or width and height, not both")
        if "aspect" in p:
            raw = p.raw.get("aspect", str(p["aspect"]))
            m = _ASPECT.fullmatch(str(raw))
            if not m or not float(m[1]) or not float(m[2]):
                raise fail(kline("aspect"), f"{label}: aspect {raw!r} must look like \"9:16\" (width:height)")
            aspect = f"{_num(m[1])}:{_num(m[2])}"
            width, height = grid_size(float(m[1]) / float(m[2]), limits)
        elif "width" in p and "height" in p:
            width, height = p["width"], p["height"]
            for k, v in (("width", width), ("height", height)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise fail(kline(k), f"{label}: {k} must be an integer, got {v!r}")
                if v % limits.size_multiple or not limits.min_size <= v <= limits.max_size:
                    raise fail(kline(k), f"{label}: {k}={v} is not on the model's grid; nearest allowed is "
                                         f"{limits.nearest_size(v)} (multiples of {limits.size_multiple} from "
                                         f"{limits.min_size} to {limits.max_size})")
            if width * height > limits.max_pixels:
                raise fail(kline("width"), f"{label}: {width}x{height} is {width * height} pixels; "
                                           f"the model's maximum is {limits.max_pixels}")
            aspect = f"{width}x{height}"
        else:
            raise fail(pline, f"{label}: give an aspect (\"9:16\") or both width and height")
        fps = fps_default
        if "fps" in p:
            fps = p["fps"]
            if isinstance(fps, bool) or not isinstance(fps, int) or not limits.min_fps <= fps <= limits.max_fps:
                raise fail(kline("fps"),
                           f"{label}: fps must be an integer in {limits.min_fps}..{limits.max_fps}, got {fps!r}")
        seconds = p.get("seconds", limits.default_seconds)
        if (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0
                or not math.isfinite(seconds)):
            raise fail(kline("seconds"), f"{label}: seconds must be a positive number, got {seconds!r}")
        max_seconds = limits.max_frames / fps
        frames = limits.frames_for(seconds, fps)
        if frames > limits.max_frames:
            raise fail(kline("seconds"), f"{label}: {seconds:g} s exceeds the model's maximum of {max_seconds:g} s at "
                                         f"{fps} fps ({limits.max_frames} frames); shorten it or lower fps")
        name = p.get("name", f"{aspect.replace(':', 'x')}-{_num(str(seconds))}s")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise fail(kline("name"), f"{label}: name {name!r} must match {_NAME.pattern}")
        if any(q.name == name for q in out):
            raise fail(kline("name"), f"placement name {name!r} is used twice; name each placement")
        out.append(Placement(name, width, height, float(seconds), fps, aspect))
    return out


def _seeds(doc: _Map, fail) -> list[int] | int:
    if "seeds" not in doc:
        return 1
    s, at = doc["seeds"], doc.key_lines["seeds"]
    if isinstance(s, int) and not isinstance(s, bool):
        if not 1 <= s <= MAX_SEEDS:
            raise fail(at, f"seeds must be a count in 1..{MAX_SEEDS} or a list of seeds, got {s}")
        return s
    if isinstance(s, list) and s and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in s):
        if len(set(s)) != len(s):
            raise fail(at, "seeds lists a seed twice")
        return list(s)
    raise fail(at, f"seeds must be a count in 1..{MAX_SEEDS} or a non-empty list of integers in 0..2^32-1, got {s!r}")


def _exclusions(doc: _Map, axes: dict[str, list[str]], fail) -> list[dict[str, set[str]]]:
    if "exclude" not in doc or doc["exclude"] is None:
        return []
    node, at = doc["exclude"], doc.key_lines["exclude"]
    if not isinstance(node, _Seq):
        raise fail(at, "exclude must be a list of {axis: value or [values]} entries")
    out = []
    for i, entry in enumerate(node):
        eline = node.item_lines[i]
        if not isinstance(entry, _Map) or not entry:
            raise fail(eline, f"exclusion {i + 1} must be a non-empty mapping of axis → value(s)")
        rule: dict[str, set[str]] = {}
        for axis, values in entry.items():
            kat = entry.key_lines[axis]
            if axis not in axes:
                raise fail(kat, f"exclusion {i + 1}: unknown axis {axis!r} (axes: {', '.join(axes)})")
            vals = values if isinstance(values, list) else [values]
            texts = set()
            for v in vals:
                s = _scalar_text(v)
                if s not in axes[axis]:
                    raise fail(kat, f"exclusion {i + 1}: {s!r} is not a value of axis {axis!r}")
                texts.add(s)
            rule[axis] = texts
        out.append(rule)
    return out


# --------------------------------------------------------------------------------------------
# Sizes


def grid_size(aspect: float, limits: GridLimits, pixels: int | None = None) -> tuple[int, int]:
    """The (width, height) on the model's grid whose ratio is nearest `aspect` (width / height),
    at about `pixels` pixels (default: the model's default width × height), within its limits.
    Ties on ratio go to the size nearest the pixel target."""
    m = limits.size_multiple
    target = pixels or limits.default_width * limits.default_height
    sizes = range(limits.min_size, limits.max_size + 1, m)
    best, best_key = None, None
    for w in sizes:
        for h in sizes:
            if w * h > limits.max_pixels:
                continue
            ratio_err = abs(math.log((w / h) / aspect))
            area_err = abs(math.log(w * h / target))
            # Ratio first (to ~2%), then closeness to the pixel budget.
            key = (round(ratio_err / 0.02), area_err, ratio_err)
            if best_key is None or key < best_key:
                best, best_key = (w, h), key
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------
# Expansion


def _variants(spec: CampaignSpec):
    names = list(spec.axes)
    for combo in itertools.product(*(spec.axes[a] for a in names)):
        values = dict(zip(names, combo))
        if any(all(values[a] in vs for a, vs in rule.items()) for rule in spec.exclude):
            continue
        yield values


def variant_key(values: dict[str, str]) -> str:
    """A stable hash of a variant's axis values (independent of the order of the axes)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def expand(spec: CampaignSpec | str, sample: int | None = None, seed: int = 0, *,
           model: str | None = None) -> list[dict[str, Any]]:
    """Manifest rows for the campaign: every variant (or a seeded sample of `sample` variants)
    × every placement × every seed.

    The sample orders the variants by a hash of (`seed`, variant) and keeps the first N: the same
    seed gives the same sample whatever the order of the spec, and a larger N keeps the smaller
    sample's variants.
    """
    if isinstance(spec, str):
        spec = load_spec(spec, model=model)
    variants = list(_variants(spec))
    if sample is not None:
        if sample < 1:
            raise CampaignError(f"{spec.source}: --sample must be 1 or more, got {sample}")
        variants.sort(key=lambda v: hashlib.sha256(f"{seed}\0{variant_key(v)}".encode()).digest())
        variants = variants[:sample]
    rows = []
    for values in variants:
        vkey = variant_key(values)
        prompt = spec.template.format(**values)
        negative = spec.negative_prompt.format(**values) if spec.negative_prompt else ""
        for placement in spec.placements:
            seeds = spec.seeds if isinstance(spec.seeds, list) else range(spec.seeds)
            for i, s in enumerate(seeds):
                # The id hashes what makes the clip a distinct variant: values, placement, seed slot.
                token = json.dumps({"values": values, "placement": placement.name,
                                    "seed": s if isinstance(spec.seeds, list) else f"#{i}"},
                                   sort_keys=True, ensure_ascii=False)
                digest = hashlib.sha256(token.encode()).hexdigest()
                clip_id = f"{spec.name}-{digest[:12]}"
                assert ID_PATTERN.fullmatch(clip_id), clip_id
                clip_seed = s if isinstance(spec.seeds, list) else int(digest[12:20], 16)
                row: dict[str, Any] = {
                    "id": clip_id, "prompt": prompt, "negative_prompt": negative,
                    "seconds": placement.seconds, "fps": placement.fps,
                    "width": placement.width, "height": placement.height, "seed": clip_seed,
                }
                if spec.steps is not None:
                    row["steps"] = spec.steps
                if spec.guidance is not None:
                    row["guidance"] = spec.guidance
                row.update(campaign=spec.name, placement=placement.name, aspect=placement.aspect,
                           variant=vkey[:12])
                row.update(values)
                rows.append(row)
    if not rows:
        raise CampaignError("the campaign expands to no rows")
    return rows


def _scalar_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) < 1e15 else str(v)
    return str(v)


def _num(s: str) -> str:
    f = float(s)
    return str(int(f)) if f.is_integer() else s


def _int(doc: _Map, key: str, fail, *, lo: int, hi: int) -> int:
    v = doc[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise fail(doc.key_lines[key], f"{key} must be an integer in {lo}..{hi}, got {v!r}")
    return v


def _kind(v: Any) -> str:
    kinds = {dict: "a mapping", _Map: "a mapping", list: "a list", _Seq: "a list", type(None): "nothing"}
    return kinds.get(type(v), type(v).__name__)


__all__ = ["CampaignError", "CampaignSpec", "Placement", "expand", "grid_size", "load_spec",
           "variant_key"]
