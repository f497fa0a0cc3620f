"""The policy's text normalising: evasions are seen through, in both readings."""

from __future__ import annotations

import pytest

from pipeline.prompt.safety.normalise import normalise


def test_normalise_gives_the_plain_and_the_decoded_reading():
    assert normalise("G0R3 everywhere") == ("g0r3 everywhere", "gore everywhere")
    assert normalise("g o r e, in 1990!") == ("g o r e in 1990", "gore in 1990")   # digits alone stay digits
    assert normalise("Ｇö\u200bre") == ("gore", "gore")                                # width, diacritics, zero-width


@pytest.mark.parametrize("text", [
    "g0r3 everywhere", "GORE", "g o r e", "g.o.r.e", "g-0-r-e", "g_o_r_e", "gooooore", "gőre", "GÖRE",
    "go\u200bre", "go\u00adre",                       # zero-width space, soft hyphen
    "ＧＯＲＥ",                                         # full-width
    "g\u043ere",                                      # Cyrillic o
    "𝐠𝐨𝐫𝐞",                                            # mathematical bold
    "bl00d s0aked", "bloodsoaked", "de-cap-it-ation",
])
def test_evasions_are_seen_through(default, text):
    v = default.check(text)
    assert v is not None and v.category == "graphic_violence", (text, normalise(text), v)
