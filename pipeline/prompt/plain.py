"""What every recaptioner is (`Recaptioner`, told in `pipeline.prompt.recaption`, the registry that
loads them by name or spec), and the plain one that keeps the user's words (`PlainRecaptioner`, the
registry's "plain" and the LLM recaptioner's default fallback)."""

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
