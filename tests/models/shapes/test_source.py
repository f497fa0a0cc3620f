"""The shapes world as training clips (`ShapesWorldSource`): held-in scenes only, at the size asked
for, with their canonical captions, the same clips for the same seed."""

import numpy as np

from models.shapes.source import ShapesWorldSource
from models.shapes.world import scene_from_caption


def test_source_draws_held_in_clips_with_their_captions():
    source = ShapesWorldSource(width=32, height=48, frames=8)
    assert len(source.captions) == 784 - 4 * 4 * 7 == len(set(source.captions))
    assert not any(scene_from_caption(c).held_out for c in source.captions)
    clips, captions = source.sample(np.random.default_rng(3), 5)
    assert clips.shape == (5, 8, 48, 32, 3) and clips.dtype == np.uint8
    assert len(captions) == 5 and set(captions) <= set(source.captions)
    again, same = source.sample(np.random.default_rng(3), 5)
    assert np.array_equal(clips, again) and captions == same
