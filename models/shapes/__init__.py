"""The default model's own world: the procedural shapes world it was trained on (`world`), its
caption style (`lexicon`, `recaptioner`), its metric (`judge`), the training clips (`source`) and
the shipped set of free-form user prompts it is evaluated on (`EVAL_PROMPTS`). See docs/SHAPES_WORLD.md."""

from pathlib import Path

#: JSON Lines of free-form user prompts, each with the scene a correct clip shows (`reel eval`).
EVAL_PROMPTS = Path(__file__).with_name("eval_prompts.jsonl")
