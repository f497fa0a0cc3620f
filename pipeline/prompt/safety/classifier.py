"""A policy's optional classifier: a transformers sequence classifier (model and tokenizer saved with
`save_pretrained`) in a local folder or under an fsspec URI, copied once per machine by
`models.interface.local_model_dir` and loaded with `local_files_only=True`: nothing is downloaded
from a hub. It runs per text, after the term rules found nothing; a label listed under `labels`
blocks when its probability (sigmoid for multi-label models, else softmax) reaches `threshold`.

    spec = classifier_spec(doc["classifier"], where, base_dir, categories)   # checked, path resolved
    loaded = load_classifier(spec)                    # (tokenizer, model, label ids); PolicyError
    verdict = classify(loaded, spec, texts)           # None, or Verdict(category, "classifier: ...")
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

from models.interface import local_model_dir
from pipeline.errors import one_line
from pipeline.prompt.safety.normalise import normalise
from pipeline.prompt.safety.rules import CATEGORY_NAME, PolicyError, Verdict, check_keys

__all__ = ["classifier_spec", "classify", "load_classifier"]

_CLF_KEYS = {"path", "labels", "threshold", "max_length"}


def classifier_spec(doc: Any, where: str, base_dir: str | None, categories: set[str]) -> dict | None:
    if doc is None:
        return None
    cwhere = f"{where}: classifier"
    if not isinstance(doc, dict):
        raise PolicyError(f"{cwhere} must be a mapping with path, labels, threshold")
    check_keys(doc, _CLF_KEYS, cwhere)
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
        if not CATEGORY_NAME.fullmatch(v):
            raise PolicyError(f"{cwhere}: label category {v!r} must be lower-case letters, digits and '_'")
    threshold = doc.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise PolicyError(f"{cwhere}: 'threshold' must be a number in (0, 1], got {threshold!r}")
    max_length = doc.get("max_length", 256)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
        raise PolicyError(f"{cwhere}: 'max_length' must be an integer >= 8, got {max_length!r}")
    return {"path": path, "labels": dict(labels), "threshold": float(threshold), "max_length": max_length}


def load_classifier(spec: dict):
    uri = spec["path"]
    try:
        local = local_model_dir(uri, "classifier")
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
        raise PolicyError(f"classifier at {uri} does not load as a transformers sequence classifier with "
                          f"its tokenizer ({type(e).__name__}: {one_line(e, 200, show_type=False)})") from None
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


def classify(loaded, spec: dict, texts: list[str]) -> Verdict | None:
    """The verdict of the loaded classifier (`load_classifier(spec)`) on `texts`: the label with the
    highest probability at or over the threshold, over every text; None when none reaches it."""
    import torch

    tokenizer, model, label_ids = loaded
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
