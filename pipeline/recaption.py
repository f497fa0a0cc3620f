"""Recaptioning: turn a short user prompt into the caption style the model was trained on.

Sora (after DALL·E 3) trains on long, detailed captions and rewrites each user prompt into that
style before sampling. A recaptioner is anything with a `name` (recorded in the metadata and part
of the resume key, so changing it re-renders) and `recaption(prompt, seed) -> caption`; the seed
lets a recaptioner fill in what the prompt leaves open, reproducibly.

Registered: "plain" (`PlainRecaptioner`) and "shapes" (`pipeline.shapes_recaption.ShapesRecaptioner`,
the shapes world's canonical captions; it loads the MiniLM vocabulary index once per process).
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable


@runtime_checkable
class Recaptioner(Protocol):
    name: str

    def recaption(self, prompt: str, seed: int) -> str: ...


class PlainRecaptioner:
    """Keeps the user's words: whitespace normalised, first letter capitalised, a closing full stop.

    The default for models trained on free-form captions; models with a canonical caption style
    register their own recaptioner under their config's `recaptioner` name.
    """

    name = "plain-1"

    def recaption(self, prompt: str, seed: int) -> str:
        caption = " ".join(prompt.split())
        if not caption:
            raise ValueError("prompt is empty")
        caption = caption[0].upper() + caption[1:]
        return caption if caption[-1] in ".!?" else caption + "."


def _shapes() -> Recaptioner:
    from pipeline.shapes_recaption import ShapesRecaptioner  # loads MiniLM: only when asked for

    return ShapesRecaptioner()


RECAPTIONERS: dict[str, Callable[[], Recaptioner]] = {"plain": PlainRecaptioner, "shapes": _shapes}


def load_recaptioner(spec: str) -> Recaptioner:
    """A recaptioner by registered name."""
    try:
        factory = RECAPTIONERS[spec]
    except KeyError:
        raise ValueError(f"unknown recaptioner {spec!r} (known: {', '.join(sorted(RECAPTIONERS))})") from None
    return factory()
