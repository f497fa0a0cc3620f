"""The recaptioner registry: it loads an LLM recaptioner's fallback by name and hands it over, so the
LLM recaptioner never imports the registry (one-way: recaption -> llm)."""

import subprocess
import sys

import pytest

from pipeline.prompt.llm import LLMRecaptioner
from pipeline.prompt.plain import PlainRecaptioner
from pipeline.prompt.recaption import load_recaptioner

URL = "http://127.0.0.1:9/v1"       # never asked: an OpenAI client is built without a request


def test_llm_does_not_import_the_registry():
    code = "import sys, pipeline.prompt.llm; assert 'pipeline.prompt.recaption' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_fallback_is_loaded_by_name_and_named_in_the_llm_recaptioner(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    default = load_recaptioner(f"openai:m@{URL}")
    assert isinstance(default.fallback, PlainRecaptioner)
    assert load_recaptioner(f"openai:m@{URL};fallback=plain").name == default.name
    assert LLMRecaptioner("openai", "m", base_url=URL).name == default.name
    nested = load_recaptioner(f"openai:m@{URL};fallback=openai:n@{URL}")
    assert isinstance(nested.fallback, LLMRecaptioner) and nested.fallback.name.startswith("llm-1:openai:n:")
    assert nested.name != default.name                                  # the fallback's name is in the name
    with pytest.raises(ValueError, match="unknown recaptioner 'nope'"):
        load_recaptioner(f"openai:m@{URL};fallback=nope")


def test_verbatim_keeps_the_prompt_as_written():
    r = load_recaptioner("verbatim")
    assert r.name == "verbatim-1"
    assert r.recaption("  a red ball   moves right ", 7, context="A cat.") == "  a red ball   moves right "
    with pytest.raises(ValueError, match="prompt is empty"):
        r.recaption("   ", 1)
