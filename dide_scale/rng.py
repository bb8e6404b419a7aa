"""Randomness that survives a restart: every draw of a training step is a pure function of
(seed, rank, step, micro-step).

A resumed run cannot replay the global RNG's history (new DataLoader iterators, evaluation
and probe loaders all draw from it at different times), so nothing in a step reads it:
``step_rng`` seeds a private copy of the global state (dropout, drop-path) and hands out a
generator for the draws the code makes itself (hard-negative mining, a fusion student's ITM
rows), both from the step's own key.  The same key gives the same draws on the first try
and after any number of restarts.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A 63-bit seed for micro-batch ``micro`` of optimizer step ``step`` on ``rank``."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x5EED, int(rank), int(step), int(micro)])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) >> 1


@contextmanager
def step_rng(key: int, device: torch.device):
    """Within the block, the global RNGs (CPU and this rank's GPU) start from ``key`` and are
    restored afterwards; yields a generator on ``device`` seeded with ``key`` for explicit draws."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(key)
        yield torch.Generator(device=device).manual_seed(key)
