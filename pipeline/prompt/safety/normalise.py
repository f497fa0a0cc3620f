"""The policy's text normalising: texts and terms are folded the same way, and each text is read
twice, as written and decoded against evasions.

    plain, decoded = normalise("G0R3 everywhere")     # ("g0r3 everywhere", "gore everywhere")

Both the text and the terms are NFKC-normalised, case-folded, stripped of diacritics and of invisible
characters (zero-width spaces, soft hyphens) (`fold`), and split into words of letters and digits;
punctuation separates words. Each text is then checked twice: as written, and decoded against
evasions, where lookalike Cyrillic/Greek letters become Latin, leetspeak inside words becomes letters
("g0r3" → gore, "$ex" → sex, "k!ll" → kill), punctuation inside a word is dropped ("de-cap-it-ation",
"g.o.r.e" → decapitation, gore), runs of three or more single characters are joined ("g o r e" →
gore) and letters repeated three or more times are squeezed ("gooore" → gore). Decoding never removes
a match: the plain reading is checked too. A match in either reading blocks.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["fold", "normalise"]

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


def fold(text: str) -> str:
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
    base = fold(text)
    return " ".join(_plain_words(base)), " ".join(_decoded_words(base))
