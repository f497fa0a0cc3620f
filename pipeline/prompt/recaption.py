"""Recaptioning: turn a short user prompt into the caption style the model was trained on.

Sora (after DALL·E 3) trains on long, detailed captions and rewrites each user prompt into that
style before sampling. A recaptioner is anything with a `name` (recorded in the metadata and part
of the resume key, so changing it re-renders) and `recaption(prompt, seed, context="") -> caption`;
the seed lets a recaptioner fill in what the prompt leaves open, reproducibly, and `context` (the
caption of a storyboard's previous shot) is what it fills in from first, so shots keep their subject.

Registered: "plain" (`pipeline.prompt.plain.PlainRecaptioner`), "verbatim" (`VerbatimRecaptioner`:
the prompt as written, the default of open checkpoints such as Wan) and every caption style a model
registers in `models.interface.MODEL_RECAPTIONERS` ("shapes": the shapes world's canonical captions,
which loads the MiniLM vocabulary index once per process).
Spec strings starting with "llm:" or "openai:" load an LLM recaptioner (`pipeline.prompt.llm`):
"llm:PATH_OR_URI" (a local transformers causal LM) or "openai:MODEL@BASE_URL" (an OpenAI-compatible
chat endpoint), optionally followed by ";fallback=NAME;keep=0.8;temperature=0.7"; the fallback is
loaded here, by its name (default "plain"), and handed to the LLM recaptioner.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from models.interface import MODEL_RECAPTIONERS, model_recaptioner
from pipeline.prompt.plain import PlainRecaptioner, Recaptioner, VerbatimRecaptioner

RECAPTIONERS: dict[str, Callable[[], Recaptioner]] = {
    "plain": PlainRecaptioner,
    "verbatim": VerbatimRecaptioner,
    **{name: functools.partial(model_recaptioner, name) for name in MODEL_RECAPTIONERS},
}


LLM_PREFIXES = ("llm:", "openai:")


def check_recaptioner_spec(spec: str) -> None:
    """Raises ValueError unless `spec` names a registered recaptioner or is a well-formed LLM spec;
    loads nothing."""
    if spec in RECAPTIONERS:
        return
    if spec.startswith(LLM_PREFIXES):
        from pipeline.prompt.llm import parse_spec

        parse_spec(spec)
        return
    raise ValueError(f"unknown recaptioner {spec!r}: write one of {', '.join(sorted(RECAPTIONERS))}, "
                     "'llm:PATH_OR_URI' (a local transformers causal LM) or 'openai:MODEL@BASE_URL' "
                     "(an OpenAI-compatible endpoint)")


def load_recaptioner(spec: str) -> Recaptioner:
    """A recaptioner by registered name, or an LLM recaptioner by spec ("llm:…", "openai:…")."""
    if spec in RECAPTIONERS:
        return RECAPTIONERS[spec]()
    check_recaptioner_spec(spec)
    from pipeline.prompt.llm import from_spec, parse_spec  # transformers / openai: only when asked for

    return from_spec(spec, load_recaptioner(parse_spec(spec).options.get("fallback", "plain")))
