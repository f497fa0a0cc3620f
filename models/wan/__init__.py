"""Wan 2.1 / 2.2 text-to-video checkpoints in diffusers' layout as reelforge generators: reading and
checking a folder (`folder`), the digest of its weights (`digest`), loading its parts (`components`)
and rendering with `WanPipeline`'s semantics (`generator`). Reached through `models.interface`
(`load_generator`, `describe_model` dispatch here for a folder or URI holding model_index.json)."""
