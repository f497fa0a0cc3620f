"""What a policy is built from: its error, the verdict it gives, and its categories' rules compiled to
regular expressions over the normalised text (`pipeline.prompt.safety.normalise`). How terms, allow
entries and patterns match is told in `pipeline.prompt.safety.policy` (the file format).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError
from pipeline.prompt.safety.normalise import fold

__all__ = ["CATEGORY_NAME", "Category", "PolicyError", "Verdict", "blocked_reason", "check_keys",
           "compile_category", "first_unallowed", "spans", "str_list", "term_of", "words_regex"]

CATEGORY_NAME = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")


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
# Checking a policy document's parts

def check_keys(doc: dict, known: frozenset[str] | set[str], where: str) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")


def str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where} must be a list of strings, got {type(value).__name__}: {str(value)[:60]}")
    return list(value)


# --------------------------------------------------------------------------------------------
# Compiled rules

_TERM_WORD = re.compile(r"[^\W_]+\*?")


def _term_regex(term: str, where: str) -> str:
    if not isinstance(term, str) or not term.strip():
        raise PolicyError(f"{where}: every entry must be a non-empty string, got {term!r}")
    words = _TERM_WORD.findall(fold(term))
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


def words_regex(terms: list[str], where: str) -> re.Pattern | None:
    if not terms:
        return None
    parts = [_term_regex(t, where) for t in terms]
    # longest first so the reported match is the most specific one
    return re.compile(r"(?<![^\W_])(?:" + "|".join(sorted(set(parts), key=len, reverse=True)) + r")(?![^\W_])")


def term_of(terms: list[str], matched: str, where: str) -> str:
    """The policy term that produced `matched` (for the verdict)."""
    for t in terms:
        if re.fullmatch(_term_regex(t, where), matched):
            return t
    return matched


@dataclass
class Category:
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


_CAT_KEYS = {"description", "terms", "patterns", "all_of", "allow"}


def compile_category(name: Any, body: Any, where: str) -> Category:
    """One entry of a policy's `categories`, checked and compiled; `where` names the policy in errors."""
    cwhere = f"{where}: category {name!r}"
    if not isinstance(name, str) or not CATEGORY_NAME.fullmatch(name):
        raise PolicyError(f"{cwhere}: names are lower-case letters, digits and '_' "
                          "(e.g. graphic_violence)")
    if not isinstance(body, dict):
        raise PolicyError(f"{cwhere}: must be a mapping with terms/patterns/all_of/allow, "
                          f"got {type(body).__name__}")
    check_keys(body, _CAT_KEYS, cwhere)
    cat = Category(
        name=name, description=str(body.get("description") or ""),
        terms=str_list(body.get("terms"), f"{cwhere}: terms"),
        patterns=str_list(body.get("patterns"), f"{cwhere}: patterns"),
        all_of=[], allow=str_list(body.get("allow"), f"{cwhere}: allow"))
    all_of = body.get("all_of") or []
    if not isinstance(all_of, list) or len(all_of) == 1:
        raise PolicyError(f"{cwhere}: all_of must be a list of two or more term lists "
                          "(e.g. [[child, kid], [nude, naked]])")
    cat.all_of = [str_list(g, f"{cwhere}: all_of[{i}]") for i, g in enumerate(all_of)]
    if any(not g for g in cat.all_of):
        raise PolicyError(f"{cwhere}: all_of lists must not be empty")
    if not (cat.terms or cat.patterns or cat.all_of):
        raise PolicyError(f"{cwhere}: give at least one of terms, patterns, all_of")
    cat.terms_re = words_regex(cat.terms, f"{cwhere}: terms")
    cat.all_of_re = [words_regex(g, f"{cwhere}: all_of[{i}]") for i, g in enumerate(cat.all_of)]
    cat.allow_re = words_regex(cat.allow, f"{cwhere}: allow")
    for p in cat.patterns:
        try:
            cat.patterns_re.append(re.compile(p, re.IGNORECASE))
        except re.error as e:
            raise PolicyError(f"{cwhere}: pattern {p!r} is not a valid regular expression ({e}); "
                              "fix or remove it") from None
    return cat


def spans(regex: re.Pattern | None, text: str) -> list[tuple[int, int]]:
    return [m.span() for m in regex.finditer(text)] if regex is not None else []


def first_unallowed(regex: re.Pattern | None, text: str, allowed: list[tuple[int, int]]) -> re.Match | None:
    if regex is None:
        return None
    for m in regex.finditer(text):
        s, e = m.span()
        if s == e:
            continue
        if not any(a <= s and e <= b for a, b in allowed):
            return m
    return None
