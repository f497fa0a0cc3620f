"""The policy's optional classifier: a tiny one trained here, from a folder and from an fsspec URI,
its threshold, pickling, and its errors."""

from __future__ import annotations

import json
import pickle

import pytest

import models.files
from pipeline import storage
from pipeline.prompt.safety.policy import PolicyError, SafetyPolicy, blocked_reason, load_policy

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


def test_classifier_from_an_fsspec_uri_relative_path_and_threshold(classifier_dir, tmp_path, monkeypatch):
    # copy the saved folder to memory:// and load it from there (through this test's own model cache)
    monkeypatch.setattr(models.files, "CACHE_DIR", tmp_path / "cache")
    for f in classifier_dir.iterdir():
        storage.write_bytes_atomic(f"memory://safety-clf/model/{f.name}", f.read_bytes())
    storage.write_bytes_atomic("memory://safety-clf/policy.yaml", b"""
categories:
  gore: {terms: [gore]}
classifier: {path: model, labels: {zorblax: creatures}, threshold: 0.5}
""")
    p = load_policy("memory://safety-clf/policy.yaml")
    assert p.classifier["path"] == "memory://safety-clf/model"
    assert (tmp_path / "cache" / "models").is_dir()
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
