"""Training clips: where they come from (`ClipSource`), as the autoencoder's input (`to_tensor`),
and drawn ahead of the steps in worker processes (`prefetched`)."""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Protocol

import numpy as np
import torch


class ClipSource(Protocol):
    """Where training clips come from (the shapes world in practice: `models.shapes.source`).

        source.captions              every training caption (encoded once, cached)
        source.sample(rng, n)        (uint8 clips (n, T, H, W, 3), captions) of fresh random clips
    """

    captions: list[str]

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str]]:
        ...


def to_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 (B, T, H, W, 3) → float (B, 3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


@contextlib.contextmanager
def prefetched(fn: Callable, keys, workers: int):
    """An iterator over `fn(key)` for `keys` in order. With `workers` > 0 the calls run up to
    2 x workers keys ahead in that many spawned processes (`fn` must pickle); the pool is shut
    down when the block is left, also early."""
    if workers <= 0:
        yield (fn(k) for k in keys)
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def results():
        it, pending = iter(keys), collections.deque()
        for key in it:
            pending.append(pool.submit(fn, key))
            if len(pending) >= 2 * workers:
                break
        while pending:
            done = pending.popleft().result()
            for key in it:
                pending.append(pool.submit(fn, key))
                break
            yield done

    try:
        yield results()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
