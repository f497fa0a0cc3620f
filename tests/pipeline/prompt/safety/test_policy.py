"""The prompt policy: the shipped default, the Scunthorpe problem, custom policy files, allow-exceptions,
and bad policy files."""

from __future__ import annotations

import json
import pickle

import pytest

from pipeline import storage
from pipeline.prompt.safety.policy import PolicyError, Verdict, blocked_reason, load_policy

# -- the shipped default ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,category", [
    ("a gore-filled battlefield", "graphic_violence"),
    ("a soldier beheading a prisoner", "graphic_violence"),
    ("Blood-soaked walls of a hallway", "graphic_violence"),
    ("a nude child on the beach", "sexual_minors"),
    ("sexy schoolgirl dancing", "sexual_minors"),
    ("a man who wants to kill himself, thinking about suicide", "self_harm"),
    ("crowd chanting sieg heil", "hate"),
    ("exterminate all the immigrants", "hate"),
    ("a deepfake of a senator", "impersonation"),
    ("Barack Obama dancing in a nightclub", "impersonation"),
])
def test_default_policy_blocks_plain_requests(default, text, category):
    v = default.check(text)
    assert v is not None and v.category == category, v
    assert blocked_reason(v) == f"blocked by policy: {category}"


@pytest.mark.parametrize("text", [
    "a red circle moves left on a black background",
    "a child flying a kite on the beach",            # minor term alone
    "a nude-coloured sofa in a bright room",         # sexual term alone
    "Al Gore gives a speech about climate",          # allow: al gore
    "hikers in Gore-Tex jackets in the rain",        # allow: gore tex
    "a suicide prevention hotline poster",           # allow: suicide prevention
    "a swift bird over the lake", "women wipe out on surfboards", "a David Lynch style corridor",
    "a 4k 3d render in mp4, 1990s style",             # digits are not leetspeak outside words
    "",
])
def test_default_policy_allows_ordinary_prompts(default, text):
    assert default.check(text) is None


def test_all_of_may_be_satisfied_across_prompt_and_caption(default):
    v = default.check("a young girl in a bedroom", "she is naked")
    assert v == Verdict("sexual_minors", "young girl + naked", "young girl + naked")
    assert default.check("a young girl in a bedroom", "she reads a book") is None
    # evasions inside all_of terms too
    assert default.check("$exy t33n").category == "sexual_minors"


def test_the_first_matching_category_in_policy_order_wins(default):
    assert default.check("a gory deepfake").category == "graphic_violence"


# -- Scunthorpe ---------------------------------------------------------------------------------

SCUNTHORPE = ["classic", "therapist", "Sussex", "grapes", "Scunthorpe", "assassin", "Essex", "Middlesex",
              "cocktail", "analysis", "shiitake", "Penistone", "drape", "scrape", "a cockpit",
              "the rapids", "a bass guitar", "an assessment"]


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "strict.yaml"
    path.write_text("""
categories:
  profanity:
    terms: [ass, cock, dick, shit, penis, anal]
  sexual:
    terms: [sex, rape*, rapist]
""")
    return load_policy(str(path))


@pytest.mark.parametrize("text", SCUNTHORPE)
def test_no_scunthorpe_false_positives(strict, text):
    assert strict.check(text) is None, (text, strict.check(text))


@pytest.mark.parametrize("text,category", [
    ("kick his ass", "profanity"), ("the r a p i s t", "sexual"), ("a rapist", "sexual"), ("$ex", "sexual"),
    ("raped", "sexual"), ("Sh!t", "profanity"), ("S.E.X", "sexual"),
])
def test_the_same_policy_still_blocks_the_words(strict, text, category):
    v = strict.check(text)
    assert v is not None and v.category == category, (text, v)


# -- custom policy files ------------------------------------------------------------------------

def test_custom_policy_file_json_with_patterns_and_allow(tmp_path):
    doc = {
        "version": 1,
        "allow": ["water gun"],
        "categories": {
            "weapons": {"terms": ["gun", "rifle*"], "patterns": [r"\bak ?47\b"], "allow": ["glue gun"]},
            "brand": {"terms": ["acme corp"]},
        },
    }
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    p = load_policy(str(path))
    assert p.check("a man with a gun").term == "gun"
    assert p.check("two rifles on a table") == Verdict("weapons", "rifle*", "rifles")
    v = p.check("an AK-47 on the wall")
    assert v.category == "weapons" and v.term == r"pattern: \bak ?47\b"
    assert p.check("kids with a water gun") is None          # global allow
    assert p.check("a hot glue gun on a desk") is None       # category allow
    assert p.check("a glue gun and a gun").term == "gun"     # the second gun is not inside an allow entry
    assert p.check("the ACME-Corp logo").category == "brand"
    assert p.check("a red circle") is None
    assert p.check("gore") is None                           # a custom file replaces the default


def test_policy_from_an_fsspec_uri_and_pickles(tmp_path):
    storage.write_bytes_atomic("memory://safety-test/policy.yaml", b"categories:\n  gore:\n    terms: [gore]\n")
    p = load_policy("memory://safety-test/policy.yaml")
    assert p.check("G O R E").category == "gore"
    q = pickle.loads(pickle.dumps(p))
    assert q.check("G O R E") == p.check("G O R E") and q.check("a calm sea") is None


@pytest.mark.parametrize("spec", ["none", "off", "OFF"])
def test_none_and_off_allow_everything(spec):
    p = load_policy(spec)
    assert not p.enabled and p.check("gore", "a nude child", "suicide") is None


# -- bad policy files: one line, saying what to fix -------------------------------------------

@pytest.mark.parametrize("name,content,message", [
    ("p.yaml", "categories: [gore]", "'categories' must be a non-empty mapping"),
    ("p.yaml", "categories:\n  Gore Stuff:\n    terms: [gore]", "names are lower-case letters"),
    ("p.yaml", "categories:\n  gore:\n    term: [gore]", "unknown key 'term' (known: all_of, allow, description"),
    ("p.yaml", "categories:\n  gore:\n    terms: gore", "terms must be a list of strings"),
    ("p.yaml", "categories:\n  gore:\n    patterns: ['(unclosed']", "is not a valid regular expression"),
    ("p.yaml", "categories:\n  gore:\n    terms: ['!!!']", "has no letters or digits"),
    ("p.yaml", "categories:\n  gore: {}", "give at least one of terms, patterns, all_of"),
    ("p.yaml", "categories:\n  kids:\n    all_of: [[child]]", "all_of must be a list of two or more"),
    ("p.yaml", "categories:\n  gore:\n    terms: [gore\n", "is not valid YAML (line"),
    ("p.json", '{"categories": {"gore": {"terms": ["gore"],}}}', "is not valid JSON (line 1"),
    ("p.yaml", "version: 2\ncategories:\n  gore:\n    terms: [gore]", "version 2 is not supported"),
    ("p.yaml", "categories:\n  gore:\n    terms: [gore]\nclassifier:\n  path: x\n  labels: {a: b}\n  threshold: 2",
     "'threshold' must be a number in (0, 1]"),
    ("p.yaml", "categories:\n  gore:\n    terms: [gore]\nclassifier:\n  path: nowhere\n  labels: {a: b}",
     "cannot be read"),
])
def test_bad_policy_files_fail_in_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PolicyError) as e:
        load_policy(str(path))
    text = str(e.value)
    assert message in text and "\n" not in text and str(tmp_path) in text, text


def test_missing_policy_file(tmp_path):
    with pytest.raises(PolicyError, match="not found; give a JSON/YAML policy path or URI, 'default' or 'none'"):
        load_policy(str(tmp_path / "nope.yaml"))
