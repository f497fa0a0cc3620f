"""The prompt policy: the safety gate that runs on a row's prompt and caption before sampling.

    policy = load_policy(spec)              # once per process/actor (None: the shipped default)
    verdict = policy.check(prompt, caption) # None: allowed; else Verdict(category, term, matched)
    if verdict: errors.append(blocked_reason(verdict))   # "blocked by policy: <category>"

`spec` is None or "default" (the shipped policy below), "none"/"off" (allow everything: no gate at
all; for trusted, already-filtered manifests), or the path / fsspec URI (s3://, gs://, file://,
memory://) of a policy file in JSON (`.json`) or YAML (`.yaml`, `.yml`; other names are tried as
JSON, then YAML). A policy pickles (Ray ships it to actors); an optional classifier is loaded when
the policy is loaded and again, lazily, after unpickling.

Policy file format (docs/SAFETY.md has a full example; `python -m pipeline.prompt.safety.policy --dump` prints the
shipped default as YAML to start from):

    version: 1                       # optional; only 1 exists
    allow: [al gore, gore-tex]       # optional; exceptions for every category
    categories:                      # checked in this order; the first category that matches wins
      graphic_violence:              # name: [a-z0-9][a-z0-9_]* (it appears in errors/ reasons)
        description: free text       # optional
        terms: [gore, behead*, severed head]   # words or phrases, matched whole-word
        patterns: ['\\bblood (pours|sprays)\\b']   # optional regexes (see "What patterns see")
        all_of:                       # optional: blocks when every list has a match somewhere in
          - [child, kid, minor]       #   the checked texts (prompt and caption together)
          - [nude, naked]
        allow: [gory details of the budget]   # optional; exceptions for this category only
    classifier:                      # optional
      path: /models/prompt-guard     # local folder or fsspec URI of a transformers sequence
                                     # classifier (config, weights, tokenizer); relative paths are
                                     # relative to the policy file; nothing is downloaded from a hub
      labels: {violent: graphic_violence}   # model label -> category; other labels never block
      threshold: 0.5                 # a label blocks when its probability is >= this
      max_length: 256                # optional; tokens per text

Terms (and `allow` and `all_of` entries) are written like prompt text. A term matches whole words
only, so "ass" does not fire on "classic" and "rapist" not on "therapist"; its last word also
matches with a plural -s/-es ("beheading" matches "beheadings"), and a word ending in `*` matches
any word starting so ("behead*": beheaded, beheading). A multi-word term also matches written as one
word ("blood soaked" matches "blood-soaked" and "bloodsoaked"). An `allow` entry cancels a match that
lies inside it ("gore" inside "al gore" or "gore-tex").

Normalisation: both the text and the terms are NFKC-normalised, case-folded, stripped of
diacritics and of invisible characters (zero-width spaces, soft hyphens), and split into words of
letters and digits; punctuation separates words. Each text is then checked twice: as written, and
decoded against evasions, where lookalike Cyrillic/Greek letters become Latin, leetspeak inside words
becomes letters ("g0r3" → gore, "$ex" → sex, "k!ll" → kill), punctuation inside a word is dropped
("de-cap-it-ation", "g.o.r.e" → decapitation, gore), runs of three or more single characters are
joined ("g o r e" → gore) and letters repeated three or more times are squeezed ("gooore" → gore).
Decoding never removes a match: the plain reading is checked too. A match in either reading blocks.

What patterns see: the normalised text of one reading: lower-case words separated by single spaces,
no punctuation (`re.IGNORECASE` is set anyway). A pattern that cannot compile is a load error.

The classifier runs after the term rules, per text, and only when they found nothing.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError

__all__ = ["SafetyPolicy", "Verdict", "PolicyError", "load_policy", "blocked_reason", "normalise",
           "DEFAULT_POLICY", "ALLOW_ALL_SPECS"]

ALLOW_ALL_SPECS = frozenset({"none", "off"})
_CATEGORY = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")


class PolicyError(UserError):
    """A policy file that cannot be used; the message is one line and says what to fix."""

    show_type = True


@dataclass(frozen=True)
class Verdict:
    """Why a text was blocked.

    category: the policy category.
    term: the policy entry that matched: a term, `pattern: <regex>`, `a + b` (all_of), or
        `classifier: <label> p=<probability>`.
    matched: the words of the normalised text that matched (for logs; not shown to end users).
    """

    category: str
    term: str
    matched: str

    @property
    def reason(self) -> str:
        return blocked_reason(self)


def blocked_reason(verdict: Verdict) -> str:
    """The one-line reason written to errors/ and returned by the endpoint."""
    return f"blocked by policy: {verdict.category}"


# --------------------------------------------------------------------------------------------
# Normalisation

_WORD = re.compile(r"[^\W_]+")
# Latin lookalikes from Cyrillic and Greek (after case folding), for the decoded reading.
_HOMOGLYPHS = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ё": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "і": "i", "ї": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "ɡ": "g", "ԛ": "q",
    "ԝ": "w", "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ѵ": "v",
})
_LEET_DIGITS = str.maketrans({"0": "o", "1": "i", "2": "z", "3": "e", "4": "a", "5": "s", "6": "g",
                              "7": "t", "8": "b", "9": "g"})
# Symbols that stand for letters inside a word: @ and $ before a letter or digit, the others only
# between two (so "wow!" and "c++" keep their meaning).
_LEET_LEADING = re.compile(r"[@$](?=[^\W_])")
_LEET_INNER = re.compile(r"(?<=[^\W_])[!|+€£](?=[^\W_])")
_LEET_SYMBOLS = {"@": "a", "$": "s", "!": "i", "|": "i", "+": "t", "€": "e", "£": "l"}
_REPEATS = re.compile(r"([^\W\d_])\1{2,}")
# Punctuation inside a word ("de-cap-it-ation", "s.e.x", "g_o_r_e") is dropped in the decoded reading.
_INNER_PUNCT = re.compile(r"(?<=[^\W_])[-._'’*/\\~^·•:]+(?=[^\W_])")


def _base(text: str) -> str:
    """NFKC, case-folded, no diacritics, no invisible (format) characters."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Me", "Cf"))
    return unicodedata.normalize("NFC", text)


def _plain_words(base: str) -> list[str]:
    return _WORD.findall(base)


def _decoded_words(base: str) -> list[str]:
    text = base.translate(_HOMOGLYPHS)
    text = _LEET_LEADING.sub(lambda m: _LEET_SYMBOLS[m.group()], text)
    text = _LEET_INNER.sub(lambda m: _LEET_SYMBOLS[m.group()], text)
    text = _INNER_PUNCT.sub("", text)
    words = _WORD.findall(text)
    # Join runs of >= 3 single characters ("g o r e", "g.o.r.e"); then leetspeak inside words that
    # hold a letter ("g0re"; "1990" stays); then squeeze letters repeated 3+ times.
    joined: list[str] = []
    run: list[str] = []
    for w in words + [""]:
        if len(w) == 1:
            run.append(w)
            continue
        joined.extend(["".join(run)] if len(run) >= 3 else run)
        run = []
        if w:
            joined.append(w)
    out = []
    for w in joined:
        if not w.isdigit() and any(c.isdigit() for c in w):
            w = w.translate(_LEET_DIGITS)
        out.append(_REPEATS.sub(r"\1", w))
    return out


def normalise(text: str) -> tuple[str, str]:
    """(plain reading, decoded reading) of `text`: lower-case words joined by single spaces."""
    base = _base(text)
    return " ".join(_plain_words(base)), " ".join(_decoded_words(base))


# --------------------------------------------------------------------------------------------
# Compiled rules

_TERM_WORD = re.compile(r"[^\W_]+\*?")


def _term_regex(term: str, where: str) -> str:
    if not isinstance(term, str) or not term.strip():
        raise PolicyError(f"{where}: every entry must be a non-empty string, got {term!r}")
    words = _TERM_WORD.findall(_base(term))
    if not words:
        raise PolicyError(f"{where}: {term!r} has no letters or digits; write words, e.g. 'severed head'")

    def word_re(w: str, last: bool) -> str:
        if w.endswith("*"):
            return re.escape(w[:-1]) + r"[^\W_]*"
        return re.escape(w) + (r"(?:e?s)?" if last else "")

    spaced = " ".join(word_re(w, i == len(words) - 1) for i, w in enumerate(words))
    alts = [spaced]
    if len(words) > 1:      # "blood soaked" also as "bloodsoaked"
        alts.append("".join(word_re(w, i == len(words) - 1) for i, w in enumerate(words)))
    return "(?:" + "|".join(alts) + ")"


def _words_regex(terms: list[str], where: str) -> re.Pattern | None:
    if not terms:
        return None
    parts = [_term_regex(t, where) for t in terms]
    # longest first so the reported match is the most specific one
    return re.compile(r"(?<![^\W_])(?:" + "|".join(sorted(set(parts), key=len, reverse=True)) + r")(?![^\W_])")


def _term_of(terms: list[str], matched: str, where: str) -> str:
    """The policy term that produced `matched` (for the verdict)."""
    for t in terms:
        if re.fullmatch(_term_regex(t, where), matched):
            return t
    return matched


@dataclass
class _Category:
    name: str
    description: str
    terms: list[str]
    patterns: list[str]
    all_of: list[list[str]]
    allow: list[str]
    terms_re: re.Pattern | None = None
    patterns_re: list[re.Pattern] = field(default_factory=list)
    all_of_re: list[re.Pattern] = field(default_factory=list)
    allow_re: re.Pattern | None = None


def _spans(regex: re.Pattern | None, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in regex.finditer(text)] if regex is not None else []


def _first_unallowed(regex: re.Pattern | None, text: str, allowed: list[tuple[int, int]]) -> re.Match | None:
    if regex is None:
        return None
    for m in regex.finditer(text):
        s, e = m.span()
        if s == e:
            continue
        if not any(a <= s and e <= b for a, b in allowed):
            return m
    return None


# --------------------------------------------------------------------------------------------
# The policy

_TOP_KEYS = {"version", "description", "allow", "categories", "classifier"}
_CAT_KEYS = {"description", "terms", "patterns", "all_of", "allow"}
_CLF_KEYS = {"path", "labels", "threshold", "max_length"}


def _check_keys(doc: dict, known: frozenset[str] | set[str], where: str) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where} must be a list of strings, got {type(value).__name__}: {str(value)[:60]}")
    return list(value)


class SafetyPolicy:
    """A compiled prompt policy. Build with `load_policy` or `SafetyPolicy.from_dict`."""

    def __init__(self, categories: list[_Category], allow: list[str], classifier: dict | None,
                 source: str):
        self.categories = categories
        self.allow = allow
        self.classifier = classifier
        self.source = source
        self._allow_re = _words_regex(allow, "allow")
        self._clf = None
        self._clf_lock = threading.Lock()

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def allow_all(cls) -> "SafetyPolicy":
        """The "none"/"off" policy: no category, no classifier; `check` always returns None."""
        return cls([], [], None, "none")

    @classmethod
    def from_dict(cls, doc: Any, source: str = "<dict>", base_dir: str | None = None) -> "SafetyPolicy":
        """Validate and compile a parsed policy document (the file format in the module doc)."""
        where = f"policy {source}"
        if not isinstance(doc, dict):
            raise PolicyError(f"{where}: the top level must be a mapping with a 'categories' key, "
                              f"got {type(doc).__name__}")
        _check_keys(doc, _TOP_KEYS, where)
        if doc.get("version", 1) != 1:
            raise PolicyError(f"{where}: version {doc.get('version')!r} is not supported; use version: 1")
        cats_doc = doc.get("categories")
        if not isinstance(cats_doc, dict) or not cats_doc:
            raise PolicyError(f"{where}: 'categories' must be a non-empty mapping of category name to rules "
                              "(use the policy 'none' to allow everything)")
        categories = []
        for name, body in cats_doc.items():
            cwhere = f"{where}: category {name!r}"
            if not isinstance(name, str) or not _CATEGORY.fullmatch(name):
                raise PolicyError(f"{cwhere}: names are lower-case letters, digits and '_' "
                                  "(e.g. graphic_violence)")
            if not isinstance(body, dict):
                raise PolicyError(f"{cwhere}: must be a mapping with terms/patterns/all_of/allow, "
                                  f"got {type(body).__name__}")
            _check_keys(body, _CAT_KEYS, cwhere)
            cat = _Category(
                name=name, description=str(body.get("description") or ""),
                terms=_str_list(body.get("terms"), f"{cwhere}: terms"),
                patterns=_str_list(body.get("patterns"), f"{cwhere}: patterns"),
                all_of=[], allow=_str_list(body.get("allow"), f"{cwhere}: allow"))
            all_of = body.get("all_of") or []
            if not isinstance(all_of, list) or len(all_of) == 1:
                raise PolicyError(f"{cwhere}: all_of must be a list of two or more term lists "
                                  "(e.g. [[child, kid], [nude, naked]])")
            cat.all_of = [_str_list(g, f"{cwhere}: all_of[{i}]") for i, g in enumerate(all_of)]
            if any(not g for g in cat.all_of):
                raise PolicyError(f"{cwhere}: all_of lists must not be empty")
            if not (cat.terms or cat.patterns or cat.all_of):
                raise PolicyError(f"{cwhere}: give at least one of terms, patterns, all_of")
            cat.terms_re = _words_regex(cat.terms, f"{cwhere}: terms")
            cat.all_of_re = [_words_regex(g, f"{cwhere}: all_of[{i}]") for i, g in enumerate(cat.all_of)]
            cat.allow_re = _words_regex(cat.allow, f"{cwhere}: allow")
            for p in cat.patterns:
                try:
                    cat.patterns_re.append(re.compile(p, re.IGNORECASE))
                except re.error as e:
                    raise PolicyError(f"{cwhere}: pattern {p!r} is not a valid regular expression ({e}); "
                                      "fix or remove it") from None
            categories.append(cat)
        allow = _str_list(doc.get("allow"), f"{where}: allow")
        classifier = _classifier_spec(doc.get("classifier"), where, base_dir, {c.name for c in categories})
        policy = cls(categories, allow, classifier, source)
        if classifier is not None:
            policy._load_classifier()
        return policy

    # -- pickling (Ray): the classifier model is reloaded lazily on the other side -----------------

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_clf"] = None
        state.pop("_clf_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._clf_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"SafetyPolicy(source={self.source!r}, categories={[c.name for c in self.categories]}, "
                f"classifier={'yes' if self.classifier else 'no'})")

    @property
    def enabled(self) -> bool:
        return bool(self.categories) or self.classifier is not None

    # -- checking -----------------------------------------------------------------------------------

    def check(self, *texts: str | None) -> Verdict | None:
        """None when every text is allowed, else the first category (in policy order) that blocks.

        Texts that are None or empty are skipped; terms, patterns and allow entries apply to each
        text alone, `all_of` lists may be satisfied across texts (e.g. prompt and caption).
        """
        texts = [t for t in texts if t]
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"check() takes strings, got {type(t).__name__}")
        if not texts or not self.enabled:
            return None
        readings = [r for t in texts for r in normalise(t)]
        global_allowed = [_spans(self._allow_re, r) for r in readings]
        for cat in self.categories:
            allowed = [g + _spans(cat.allow_re, r) for g, r in zip(global_allowed, readings)]
            for r, al in zip(readings, allowed):
                m = _first_unallowed(cat.terms_re, r, al)
                if m:
                    return Verdict(cat.name, _term_of(cat.terms, m.group(), cat.name), m.group())
                for p, rx in zip(cat.patterns, cat.patterns_re):
                    m = _first_unallowed(rx, r, al)
                    if m:
                        return Verdict(cat.name, f"pattern: {p}", m.group())
            if cat.all_of:
                hits = []
                for group, rx in zip(cat.all_of, cat.all_of_re):
                    m = next((m for r, al in zip(readings, allowed) if (m := _first_unallowed(rx, r, al))), None)
                    if m is None:
                        break
                    hits.append((_term_of(group, m.group(), cat.name), m.group()))
                else:
                    return Verdict(cat.name, " + ".join(h[0] for h in hits), " + ".join(h[1] for h in hits))
        if self.classifier is not None:
            return self._classify(texts)
        return None

    # -- the optional classifier ----------------------------------------------------------------

    def _load_classifier(self):
        with self._clf_lock:
            if self._clf is None:
                self._clf = _load_classifier(self.classifier)
            return self._clf

    def _classify(self, texts: list[str]) -> Verdict | None:
        import torch

        tokenizer, model, label_ids = self._clf or self._load_classifier()
        spec = self.classifier
        with torch.inference_mode():
            enc = tokenizer(texts, padding=True, truncation=True, max_length=spec["max_length"],
                            return_tensors="pt")
            logits = model(**enc).logits.float()
            multi = getattr(model.config, "problem_type", None) == "multi_label_classification"
            probs = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=-1)
        best = None
        for label, (idx, category) in label_ids.items():
            p = float(probs[:, idx].max())
            if p >= spec["threshold"] and (best is None or p > best[0]):
                row = int(probs[:, idx].argmax())
                best = (p, label, category, texts[row])
        if best is None:
            return None
        p, label, category, text = best
        return Verdict(category, f"classifier: {label} p={p:.2f}", normalise(text)[0][:120])


def _classifier_spec(doc: Any, where: str, base_dir: str | None, categories: set[str]) -> dict | None:
    if doc is None:
        return None
    cwhere = f"{where}: classifier"
    if not isinstance(doc, dict):
        raise PolicyError(f"{cwhere} must be a mapping with path, labels, threshold")
    _check_keys(doc, _CLF_KEYS, cwhere)
    path = doc.get("path")
    if not isinstance(path, str) or not path:
        raise PolicyError(f"{cwhere}: 'path' must be a local folder or fsspec URI of a saved "
                          "transformers sequence classifier")
    if "://" not in path and not os.path.isabs(path) and base_dir is not None:
        path = posixpath.join(base_dir, path) if "://" in base_dir else os.path.join(base_dir, path)
    labels = doc.get("labels")
    if not isinstance(labels, dict) or not labels or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise PolicyError(f"{cwhere}: 'labels' must map model labels to category names, "
                          "e.g. {violent: graphic_violence}")
    for v in labels.values():
        if not _CATEGORY.fullmatch(v):
            raise PolicyError(f"{cwhere}: label category {v!r} must be lower-case letters, digits and '_'")
    threshold = doc.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise PolicyError(f"{cwhere}: 'threshold' must be a number in (0, 1], got {threshold!r}")
    max_length = doc.get("max_length", 256)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
        raise PolicyError(f"{cwhere}: 'max_length' must be an integer >= 8, got {max_length!r}")
    return {"path": path, "labels": dict(labels), "threshold": float(threshold), "max_length": max_length}


def _local_copy(uri: str) -> tuple[str, str | None]:
    """(local folder, temp folder to remove or None) for a local path or fsspec URI."""
    from pipeline import storage

    if storage.is_local(uri):
        _, path = storage.resolve(uri)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no folder {path}")
        return path, None
    fs, path = storage.resolve(uri)
    if not fs.isdir(path):
        raise FileNotFoundError(path)
    tmp = tempfile.mkdtemp(prefix="reelforge-safety-clf-")
    for src in fs.find(path):
        rel = posixpath.relpath(src, path)
        dst = os.path.join(tmp, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as f:
            f.write(fs.cat_file(src))
    return tmp, tmp


def _load_classifier(spec: dict):
    uri = spec["path"]
    try:
        local, tmp = _local_copy(uri)
    except (FileNotFoundError, OSError) as e:
        raise PolicyError(f"classifier path {uri} cannot be read ({type(e).__name__}: {e}); point 'path' "
                          "at a folder saved with save_pretrained (model and tokenizer)") from None
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise PolicyError(f"classifier path {uri} has no config.json; point 'path' at a folder saved with "
                          "model.save_pretrained() and tokenizer.save_pretrained()")
    try:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(local, local_files_only=True)
    except Exception as e:  # noqa: BLE001 — transformers raises many kinds; report one line
        text = " ".join(str(e).split())[:200]
        raise PolicyError(f"classifier at {uri} does not load as a transformers sequence classifier with "
                          f"its tokenizer ({type(e).__name__}: {text})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    by_label = {v: k for k, v in id2label.items()}
    label_ids = {}
    for label, category in spec["labels"].items():
        if label not in by_label:
            raise PolicyError(f"classifier at {uri} has no label {label!r} (its labels: "
                              f"{', '.join(id2label[i] for i in sorted(id2label))}); fix 'labels'")
        label_ids[label] = (by_label[label], category)
    return tokenizer, model, label_ids


# --------------------------------------------------------------------------------------------
# Loading

def _parse(data: bytes, spec: str) -> Any:
    import yaml

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"policy {spec} is not UTF-8 text; save it as UTF-8 JSON or YAML") from None
    lower = spec.lower()
    if lower.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"policy {spec} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    try:
        if not lower.endswith((".yaml", ".yml")):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or "syntax error"
        raise PolicyError(f"policy {spec} is not valid YAML{at}: {problem}") from None


def load_policy(spec: str | None = None) -> SafetyPolicy:
    """The policy named by `spec`: None/"default" → the shipped default, "none"/"off" → allow all,
    else a JSON/YAML policy file at a local path or fsspec URI. Raises PolicyError (one line)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "default"):
        return SafetyPolicy.from_dict(DEFAULT_POLICY, "default")
    if not isinstance(spec, (str, os.PathLike)):
        raise PolicyError(f"policy must be a path, URI, 'default' or 'none', got {type(spec).__name__}")
    spec = os.fspath(spec).strip()
    if spec.lower() in ALLOW_ALL_SPECS:
        return SafetyPolicy.allow_all()
    from pipeline import storage

    try:
        data = storage.read_bytes(spec)
    except (FileNotFoundError, IsADirectoryError):
        raise PolicyError(f"policy file {spec} not found; give a JSON/YAML policy path or URI, "
                          "'default' or 'none'") from None
    except OSError as e:
        raise PolicyError(f"policy file {spec} cannot be read ({type(e).__name__}: {e})") from None
    if storage.is_local(spec):
        base_dir = os.path.dirname(storage.resolve(spec)[1])
    else:
        base_dir = spec.rsplit("/", 1)[0]
    return SafetyPolicy.from_dict(_parse(data, spec), spec, base_dir)


# --------------------------------------------------------------------------------------------
# The shipped default. Deliberately modest: a starting point that catches the plainest requests in
# each category, not a complete list (it has no slurs, for one). Deployments are expected to supply
# their own policy file; `python -m pipeline.prompt.safety.policy --dump` prints this one as YAML.

DEFAULT_POLICY: dict[str, Any] = {
    "version": 1,
    "description": "reelforge's shipped default prompt policy (modest; supply your own)",
    "allow": ["al gore", "gore tex", "goretex", "gore vidal", "suicide squad",
              "suicide door", "suicide prevention"],
    "categories": {
        "sexual_minors": {
            "description": "sexual content involving minors: blocked outright, or by a minor term "
                           "together with a sexual term anywhere in the prompt or caption",
            "terms": ["csam", "child porn*", "child sexual abuse", "child abuse material", "loli*", "shota*",
                      "jailbait", "pedophil*", "paedophil*"],
            "all_of": [
                ["child", "children", "kid", "kiddie", "minor", "underage", "under age", "toddler", "infant",
                 "baby", "preteen", "pre teen", "teen", "teenage*", "schoolgirl", "schoolboy", "young girl",
                 "young boy", "little girl", "little boy", "year old girl", "year old boy"],
                ["nude", "naked", "nudity", "sex", "sexual*", "sexy", "porn*", "erotic*", "nsfw", "lingerie",
                 "topless", "undress*", "stripper", "striptease", "stripping", "seductive*", "intercourse",
                 "molest*", "groping", "fondl*"],
            ],
        },
        "graphic_violence": {
            "description": "graphic violence and gore",
            "terms": ["gore", "gory", "graphic violence", "dismember*", "disembowel*", "decapitat*", "behead*",
                      "eviscerat*", "mutilat*", "severed head", "severed limb*", "entrails", "guts spill*",
                      "blood soaked", "bloodbath", "blood bath", "torture porn", "snuff film", "snuff video",
                      "massacre*", "school shooting", "mass shooting", "execution video", "flayed", "skinned alive",
                      "burned alive", "burnt alive"],
        },
        "self_harm": {
            "description": "suicide and self-harm",
            "terms": ["suicide", "suicidal", "self harm", "self harming", "selfharm", "self injury",
                      "kill myself", "killing myself", "kill yourself", "kys", "cutting myself", "cut myself",
                      "slit* wrist*", "hang myself", "hanging myself", "end my life", "overdos* on purpose",
                      "pro ana", "thinspo*"],
        },
        "hate": {
            "description": "hate symbols and calls to violence against groups (no slur list is shipped)",
            "terms": ["heil hitler", "sieg heil", "white power", "white supremac*", "ethnic cleansing",
                      "race war", "kkk", "ku klux klan", "neo nazi*", "nazi propaganda", "1488", "gas the jews",
                      "final solution"],
            "all_of": [
                ["kill all", "exterminate", "exterminating", "gas all", "lynching", "lynch mob", "death to"],
                ["jews", "muslims", "christians", "blacks", "whites", "asians", "arabs", "gays", "lesbians",
                 "immigrants", "refugees", "hindus", "sikhs", "roma", "gypsies", "trans people", "women"],
            ],
        },
        "impersonation": {
            "description": "deepfakes and realistic depictions of real public figures (an illustrative list "
                           "of names; add your own)",
            "terms": ["deepfake*", "deep fake*", "face swap*", "faceswap*", "donald trump", "joe biden",
                      "kamala harris", "barack obama", "vladimir putin", "xi jinping", "volodymyr zelensky",
                      "narendra modi", "emmanuel macron", "king charles", "pope francis", "pope leo", "elon musk",
                      "taylor swift", "mark zuckerberg", "oprah winfrey"],
        },
    },
}


def _main(argv: list[str] | None = None) -> int:
    import argparse

    import yaml

    ap = argparse.ArgumentParser(prog="python -m pipeline.prompt.safety.policy",
                                 description="Check texts against a prompt policy, or print the default policy.")
    ap.add_argument("--policy", default=None, help="policy path/URI, 'default' (the default) or 'none'")
    ap.add_argument("--dump", action="store_true", help="print the shipped default policy as YAML and exit")
    ap.add_argument("texts", nargs="*", help="texts checked together (e.g. a prompt and its caption)")
    args = ap.parse_args(argv)
    if args.dump:
        sys.stdout.write(yaml.safe_dump(DEFAULT_POLICY, sort_keys=False, allow_unicode=True, width=100))
        return 0
    try:
        policy = load_policy(args.policy)
    except PolicyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    verdict = policy.check(*args.texts)
    if verdict is None:
        print("allowed")
        return 0
    print(f"{blocked_reason(verdict)} (term: {verdict.term}; matched: {verdict.matched})")
    return 1


if __name__ == "__main__":
    sys.exit(_main())
