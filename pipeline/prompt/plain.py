"""What every recaptioner is (`Recaptioner`, told in `pipeline.prompt.recaption`, the registry that
loads them by name or spec), the plain one that keeps the user's words (`PlainRecaptioner`, the
registry's "plain" and the LLM recaptioner's default fallback), and the verbatim one that keeps the
prompt exactly as written (`VerbatimRecaptioner`, "verbatim": what open checkpoints such as Wan get
by default, so a prompt gives the clip their own pipelines give for it)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Recaptioner(Protocol):
    name: str

    def recaption(self, prompt: str, seed: int, context: str = "") -> str: ...


class PlainRecaptioner:
    """Keeps the user's words: whitespace normalised, first letter capitalised, a closing full stop.

    The default for models trained on free-form captions; models with a canonical caption style
    register their own recaptioner under their config's `recaptioner` name.
    """

    name = "plain-1"

    def recaption(self, prompt: str, seed: int, context: str = "") -> str:
        caption = " ".join(prompt.split())  # free-form captions: a shot's own words are its caption
        if not caption:
            raise ValueError("prompt is empty")
        caption = caption[0].upper() + caption[1:]
        return caption if caption[-1] in ".!?" else caption + "."


class VerbatimRecaptioner:
    """The prompt is the caption, exactly as written (a model's own pipeline cleans it, as diffusers'
    `WanPipeline` does with `prompt_clean`). A storyboard's shots keep their own words too."""

    name = "verbatim-1"

    def recaption(self, prompt: str, seed: int, context: str = "") -> str:
        if not prompt.strip():
            raise ValueError("prompt is empty")
        return prompt
