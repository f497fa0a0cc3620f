"""The prompt policy: the safety gate that runs on a row's prompt and caption before sampling.

    policy = load_policy(spec)              # once per process/actor (None: the shipped default)
    verdict = policy.check(prompt, caption) # None: allowed; else Verdict(category, term, matched)
    if verdict: errors.append(blocked_reason(verdict))   # "blocked by policy: <category>"

`spec` is None or "default" (the shipped policy, default_policy.yaml beside this module),
"none"/"off" (allow everything: no gate at all; for trusted, already-filtered manifests), or the
path / fsspec URI (s3://, gs://, file://, memory://) of a policy file in JSON (`.json`) or YAML
(`.yaml`, `.yml`; other names are tried as JSON, then YAML). A policy pickles (Ray ships it to
actors); an optional classifier is loaded when the policy is loaded and again, lazily, after
unpickling.

Policy file format (docs/SAFETY.md has a full example; `python -m pipeline.prompt.safety --dump` prints
the shipped default as YAML to start from):

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

Normalisation (`pipeline.prompt.safety.normalise`): text and terms are folded alike (NFKC, case,
diacritics, invisible characters) and each text is checked twice, as written and decoded against
evasions (lookalike letters, leetspeak, punctuation or spaces inside words, repeated letters). A
match in either reading blocks.

What patterns see: the normalised text of one reading: lower-case words separated by single spaces,
no punctuation (`re.IGNORECASE` is set anyway). A pattern that cannot compile is a load error.

The classifier runs after the term rules, per text, and only when they found nothing.

The package: this module (the policy, loading, checking), `normalise` (a text's two readings),
`rules` (PolicyError, Verdict, the categories compiled), `classifier` (the optional model),
`default_policy.yaml` (the shipped default) and `__main__` (`python -m pipeline.prompt.safety`).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import yaml

from pipeline.prompt.safety.classifier import classifier_spec, classify, load_classifier
from pipeline.prompt.safety.normalise import normalise
from pipeline.prompt.safety.rules import (
    Category,
    PolicyError,
    Verdict,
    blocked_reason,
    check_keys,
    compile_category,
    first_unallowed,
    spans,
    str_list,
    term_of,
    words_regex,
)

__all__ = ["SafetyPolicy", "Verdict", "PolicyError", "load_policy", "blocked_reason", "normalise",
           "DEFAULT_POLICY", "ALLOW_ALL_SPECS"]

ALLOW_ALL_SPECS = frozenset({"none", "off"})
_TOP_KEYS = {"version", "description", "allow", "categories", "classifier"}


class SafetyPolicy:
    """A compiled prompt policy. Build with `load_policy` or `SafetyPolicy.from_dict`."""

    def __init__(self, categories: list[Category], allow: list[str], classifier: dict | None,
                 source: str):
        self.categories = categories
        self.allow = allow
        self.classifier = classifier
        self.source = source
        self._allow_re = words_regex(allow, "allow")
        self._clf = None
        self._clf_lock = threading.Lock()

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def allow_all(cls) -> SafetyPolicy:
        """The "none"/"off" policy: no category, no classifier; `check` always returns None."""
        return cls([], [], None, "none")

    @classmethod
    def from_dict(cls, doc: Any, source: str = "<dict>", base_dir: str | None = None) -> SafetyPolicy:
        """Validate and compile a parsed policy document (the file format in the module doc)."""
        where = f"policy {source}"
        if not isinstance(doc, dict):
            raise PolicyError(f"{where}: the top level must be a mapping with a 'categories' key, "
                              f"got {type(doc).__name__}")
        check_keys(doc, _TOP_KEYS, where)
        if doc.get("version", 1) != 1:
            raise PolicyError(f"{where}: version {doc.get('version')!r} is not supported; use version: 1")
        cats_doc = doc.get("categories")
        if not isinstance(cats_doc, dict) or not cats_doc:
            raise PolicyError(f"{where}: 'categories' must be a non-empty mapping of category name to rules "
                              "(use the policy 'none' to allow everything)")
        categories = [compile_category(name, body, where) for name, body in cats_doc.items()]
        allow = str_list(doc.get("allow"), f"{where}: allow")
        classifier = classifier_spec(doc.get("classifier"), where, base_dir, {c.name for c in categories})
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
        global_allowed = [spans(self._allow_re, r) for r in readings]
        for cat in self.categories:
            allowed = [g + spans(cat.allow_re, r) for g, r in zip(global_allowed, readings)]
            for r, al in zip(readings, allowed):
                m = first_unallowed(cat.terms_re, r, al)
                if m:
                    return Verdict(cat.name, term_of(cat.terms, m.group(), cat.name), m.group())
                for p, rx in zip(cat.patterns, cat.patterns_re):
                    m = first_unallowed(rx, r, al)
                    if m:
                        return Verdict(cat.name, f"pattern: {p}", m.group())
            if cat.all_of:
                hits = []
                for group, rx in zip(cat.all_of, cat.all_of_re):
                    m = next((m for r, al in zip(readings, allowed) if (m := first_unallowed(rx, r, al))), None)
                    if m is None:
                        break
                    hits.append((term_of(group, m.group(), cat.name), m.group()))
                else:
                    return Verdict(cat.name, " + ".join(h[0] for h in hits), " + ".join(h[1] for h in hits))
        if self.classifier is not None:
            return self._classify(texts)
        return None

    # -- the optional classifier ----------------------------------------------------------------

    def _load_classifier(self):
        with self._clf_lock:
            if self._clf is None:
                self._clf = load_classifier(self.classifier)
            return self._clf

    def _classify(self, texts: list[str]) -> Verdict | None:
        return classify(self._clf or self._load_classifier(), self.classifier, texts)


# --------------------------------------------------------------------------------------------
# Loading

def _parse(data: bytes, spec: str) -> Any:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"policy {spec} is not UTF-8 text; save it as UTF-8 JSON or YAML") from None
    lower = spec.lower()
    if lower.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise PolicyError(f"policy {spec} is not valid JSON "
                              f"(line {e.lineno}, column {e.colno}: {e.msg})") from None
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
# The shipped default (default_policy.yaml, package data): modest, a starting point; deployments are
# expected to supply their own policy file.

DEFAULT_POLICY: dict[str, Any] = yaml.safe_load(
    Path(__file__).with_name("default_policy.yaml").read_text(encoding="utf-8"))
