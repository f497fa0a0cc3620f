"""The prompt policy: the shipped default, evasions, the Scunthorpe problem, custom policy files,
allow-exceptions, the optional classifier (a tiny one trained here), and bad policy files."""

from __future__ import annotations

import json
import pickle

import pytest

from pipeline import storage
from pipeline.prompt.safety.policy import (DEFAULT_POLICY, PolicyError, SafetyPolicy, Verdict, blocked_reason, load_policy,
                             normalise)


@pytest.fixture(scope="module")
def default():
    return load_policy(None)


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


def test_default_spec_and_dump_round_trip(tmp_path):
    import yaml

    from pipeline.prompt.safety.policy import _main

    assert load_policy("default").check("gore").category == "graphic_violence"
    path = tmp_path / "dumped.yaml"
    path.write_text(yaml.safe_dump(DEFAULT_POLICY, sort_keys=False))
    dumped = load_policy(str(path))
    assert [c.name for c in dumped.categories] == list(DEFAULT_POLICY["categories"])
    assert _main(["gore"]) == 1 and _main(["a red circle"]) == 0


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


# -- the optional classifier ---------------------------------------------------------------------

NOUNS = ["zorblax", "cat", "dog", "car", "boat", "bird", "tree", "house", "circle", "square"]
TEMPLATES = ["{} on the beach", "{} crosses the street at night", "a {} on the beach", "the {} crosses the street",
             "two {} at night", "a red {} moves left", "people watch the {}", "a {} in the rain"]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny BERT sequence classifier with its own word-level tokenizer, trained here (one CPU
    thread, fixed seed: deterministic) to flag texts that mention a 'zorblax' — a word no term list
    holds, so a block can only come from the classifier."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = sorted({w for t in TEMPLATES for w in t.replace("{}", "").split()} | set(NOUNS)
                   | {"attack", "town", "bridge", "over", "river", "crawls", "quiet"})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, num_labels=2,
                         id2label={0: "benign", 1: "zorblax"}, label2id={"benign": 0, "zorblax": 1})
        model = BertForSequenceClassification(cfg)
        texts = [t.format(n) for t in TEMPLATES for n in NOUNS]
        y = torch.tensor([int("zorblax" in t) for t in texts])
        weight = torch.where(y == 1, 9.0, 1.0)     # one positive per nine negatives
        x = tok(texts, padding=True, return_tensors="pt")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(80):
            loss = (torch.nn.functional.cross_entropy(model(**x).logits, y, reduction="none") * weight).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert loss.item() < 0.05, f"the tiny classifier did not train (loss {loss.item():.3f})"
    finally:
        torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("clf") / "zorblax-clf"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _clf_policy(path, tmp_path, **extra):
    doc = {"categories": {"gore": {"terms": ["gore"]}},
           "classifier": {"path": str(path), "labels": {"zorblax": "creatures"}, "threshold": 0.5, **extra}}
    f = tmp_path / "clf-policy.json"
    f.write_text(json.dumps(doc))
    return load_policy(str(f))


def test_classifier_blocks_what_the_terms_miss(classifier_dir, tmp_path):
    p = _clf_policy(classifier_dir, tmp_path)
    v = p.check("a zorblax crawls over the bridge")
    assert v is not None and v.category == "creatures" and v.term.startswith("classifier: zorblax p=")
    assert float(v.term.rsplit("=", 1)[1]) > 0.9
    assert blocked_reason(v) == "blocked by policy: creatures"
    assert p.check("zorblax attack town").category == "creatures"
    assert p.check("a quiet river at night", "a zorblax on the bridge").category == "creatures"  # any text
    for text in ["a bridge over a river at night", "a quiet town", "a red square moves left", "two cats"]:
        assert p.check(text) is None, text
    assert p.check("gore and a zorblax").term == "gore"          # terms come first
    # pickled (as Ray ships it) the classifier is reloaded on first use, with the same answer
    q = pickle.loads(pickle.dumps(p))
    assert q._clf is None and q.check("a zorblax crawls over the bridge") == v


def test_classifier_from_an_fsspec_uri_relative_path_and_threshold(classifier_dir, tmp_path):
    # copy the saved folder to memory:// and load it from there
    for f in classifier_dir.iterdir():
        storage.write_bytes_atomic(f"memory://safety-clf/model/{f.name}", f.read_bytes())
    storage.write_bytes_atomic("memory://safety-clf/policy.yaml", b"""
categories:
  gore: {terms: [gore]}
classifier: {path: model, labels: {zorblax: creatures}, threshold: 0.5}
""")
    p = load_policy("memory://safety-clf/policy.yaml")
    assert p.classifier["path"] == "memory://safety-clf/model"
    assert p.check("a zorblax on the beach").category == "creatures"
    # the threshold decides: just above the model's probability lets the text through
    p_blocked = float(p.check("a zorblax on the beach").term.rsplit("=", 1)[1])
    text = "a zorblax on the beach"
    assert _clf_policy(classifier_dir, tmp_path, threshold=min(1.0, p_blocked + 0.01)).check(text) is None
    assert _clf_policy(classifier_dir, tmp_path, threshold=p_blocked - 0.01).check(text).category == "creatures"


def test_classifier_errors_are_one_line(classifier_dir, tmp_path):
    with pytest.raises(PolicyError, match=r"has no label 'violent' \(its labels: benign, zorblax\); fix 'labels'"):
        doc = {"categories": {"gore": {"terms": ["gore"]}},
               "classifier": {"path": str(classifier_dir), "labels": {"violent": "graphic_violence"}}}
        SafetyPolicy.from_dict(doc, "inline")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PolicyError, match="has no config.json"):
        _clf_policy(tmp_path / "empty", tmp_path)
