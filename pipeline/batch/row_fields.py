"""The values of a manifest row's fields, checked one by one: text, numbers, flags, shots, LoRA adapters.

Each `*_value` function takes the raw value and `bad`, a callable that makes the row's error from a
one-line reason, and returns the value as the clip spec holds it (`manifest.validate` calls them for
batch manifests and serve's requests alike).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from models.interface import GridLimits, file_version
from pipeline.errors import one_line

MAX_PROMPT_CHARS = 2000
MAX_SHOTS = 32
#: The most LoRA adapters one row may apply.
MAX_ADAPTERS = 8


#: C0/C1 control characters other than whitespace (which `_text` folds into single spaces).
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


def text_value(v: Any, name: str, bad, empty_ok: bool = False) -> str:
    if is_missing(v):
        raise bad(f"{name} is missing")
    if isinstance(v, bytes):  # a Parquet binary column: fine when it holds UTF-8 text
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"{name} is binary data that is not UTF-8 text") from None
    if not isinstance(v, str):
        raise bad(f"{name} must be text, got {type(v).__name__}")
    check_unicode(v, name, bad)
    v = " ".join(v.split())
    if not v and not empty_ok:
        raise bad(f"{name} is empty")
    if len(v) > MAX_PROMPT_CHARS:
        raise bad(f"{name} is {len(v)} characters; the limit is {MAX_PROMPT_CHARS}")
    return v


def shots_value(v: Any, bad) -> tuple[tuple[str, float], ...]:
    """A storyboard's shots as (prompt, seconds) pairs; () when the row has none."""
    if is_missing(v):
        return ()
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            raise bad("shots must be a list of {prompt, seconds} (JSON text or a list column), "
                      "got unparsable text") from None
    if not isinstance(v, (list, tuple)):
        raise bad(f"shots must be a list of {{prompt, seconds}}, got {type(v).__name__}")
    if not v:
        raise bad("shots is empty; give at least one {prompt, seconds}")
    if len(v) > MAX_SHOTS:
        raise bad(f"shots has {len(v)} entries; the limit is {MAX_SHOTS}")
    out = []
    for k, shot in enumerate(v):
        if not isinstance(shot, dict):
            raise bad(f"shots[{k}] must be an object {{prompt, seconds}}, got {type(shot).__name__}")
        # (a list column read from JSON Lines gets every row's struct fields, None where unused)
        unknown = sorted(k for k in set(shot) - {"prompt", "seconds"} if shot[k] is not None)
        if unknown:
            raise bad(f"shots[{k}] has unknown field(s) {', '.join(unknown)} (a shot is {{prompt, seconds}})")
        prompt = text_value(shot.get("prompt"), f"shots[{k}].prompt", bad)
        seconds = number_value(shot.get("seconds"), f"shots[{k}].seconds", math.nan, bad)  # missing: nan
        if not seconds > 0:
            raise bad(f"shots[{k}].seconds must be a positive number of seconds")
        out.append((prompt, seconds))
    return tuple(out)


def lora_entries(v: Any) -> list:
    """The adapter entries a `lora` value names: a URI, an object {uri, scale}, a list of either, or its
    JSON text, as a list (of what each entry is, unchecked); [] for none. ValueError for unparsable JSON."""
    if is_missing(v) or (isinstance(v, str) and not v.strip()):
        return []
    if isinstance(v, str) and v.strip()[:1] in "[{":
        v = json.loads(v)  # json.JSONDecodeError is a ValueError
    return list(v) if isinstance(v, (list, tuple)) else [v]


def lora_value(v: Any, limits: GridLimits, versions: dict[str, list | None], bad) -> tuple[tuple[str, float, str], ...]:
    """A row's LoRA adapters as (uri, scale, version) triples; () when it names none. `v`: a URI, an
    object {uri, scale}, or a list of either (or its JSON text); scale defaults to 1. Each file must
    exist (`versions` caches the look-ups of one manifest); the model must take adapters."""
    try:
        entries = lora_entries(v)
    except json.JSONDecodeError:
        raise bad("lora must be a URI, an object {uri, scale} or a list of them; got unparsable JSON") from None
    if not entries:
        return ()
    if not limits.takes_lora:
        raise bad("lora: this model takes no LoRA adapters (they are for diffusers Wan folders)")
    if len(entries) > MAX_ADAPTERS:
        raise bad(f"lora has {len(entries)} adapters; the limit is {MAX_ADAPTERS}")
    out = []
    for k, entry in enumerate(entries):
        where = f"lora[{k}]" if len(entries) > 1 else "lora"
        if isinstance(entry, dict):
            unknown = sorted(n for n in set(entry) - {"uri", "scale"} if entry[n] is not None)
            if unknown:
                raise bad(f"{where} has unknown field(s) {', '.join(unknown)} (an adapter is {{uri, scale}})")
            uri, scale = entry.get("uri"), number_value(entry.get("scale"), f"{where}.scale", 1.0, bad)
        else:
            uri, scale = entry, 1.0
        if not isinstance(uri, str) or not uri.strip():
            raise bad(f"{where} needs a uri: the adapter's safetensors file (a path or any fsspec URI)")
        uri = uri.strip()
        if uri not in versions:
            try:
                versions[uri] = file_version(uri)
            except Exception as e:  # no credentials, an unknown protocol, a network error: this row only
                raise bad(f"{where}: cannot reach {uri} ({one_line(e, 200)})") from None
        if versions[uri] is None:
            raise bad(f"{where}: file not found: {uri}")
        out.append((uri, scale, json.dumps(versions[uri])))
    return tuple(out)


def check_unicode(v: str, name: str, bad) -> None:
    """Raise `bad(reason)` for text no file or database can hold (a lone surrogate, as JSON's
    "\\ud800" decodes to) or with control characters (NUL, ESC, ...) that no prompt means."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad(f"{name} is not valid Unicode text (a lone surrogate at character {e.start})") from None
    control = CONTROL_CHARS.search(v)
    if control:
        raise bad(f"{name} holds the control character U+{ord(control.group()):04X} at character {control.start()}")


def flag_value(v: Any, name: str, bad) -> bool:
    if is_missing(v):
        return False
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "false", "yes", "no", "1", "0", ""):
        return v.strip().lower() in ("true", "yes", "1")
    raise bad(f"{name} must be true or false, got {v!r}")


def is_missing(v: Any) -> bool:
    """Whether a value is absent (null): the default applies. A NaN is a value, and not a usable one
    (pandas writes missing values as nulls), so it is refused rather than read as "default"."""
    return v is None


def number_value(v: Any, name: str, default: float, bad) -> float:
    if is_missing(v):
        return float(default)
    if isinstance(v, bool):
        raise bad(f"{name} must be a number, got a boolean")
    if isinstance(v, str):
        try:
            v = float(v.strip())
        except ValueError:
            raise bad(f"{name} must be a number, got {v!r}") from None
    if not isinstance(v, (int, float)):
        raise bad(f"{name} must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise bad(f"{name} must be a finite number, got {v} (leave it empty for the default)")
    return float(v)


def integer_value(v: Any, name: str, default: int, bad) -> int:
    if is_missing(v):
        return int(default)
    number = number_value(v, name, default, bad)
    if number != int(number):
        raise bad(f"{name} must be a whole number, got {number:g}")
    return int(number)
