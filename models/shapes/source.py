"""The shapes world as training data: a `models.training.data.ClipSource` of random held-in scenes
and their canonical captions."""

from __future__ import annotations

import numpy as np

from models.shapes.world import all_scenes, canonical_caption, render_scene, sample_scenes


class ShapesWorldSource:
    """Training clips of the shapes world (docs/SHAPES_WORLD.md): held-in scenes only, random
    placement, size and speed, 64x64 by default, with their canonical captions."""

    def __init__(self, width: int = 64, height: int = 64, frames: int = 16):
        self.width, self.height, self.frames = width, height, frames
        self.captions = [canonical_caption(s) for s in all_scenes(include_held_out=False)]

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        scenes = sample_scenes(rng, n, include_held_out=False)
        clips = np.stack([render_scene(s, width=self.width, height=self.height, frames=self.frames, rng=rng)
                          for s in scenes])
        return clips, [canonical_caption(s) for s in scenes]
