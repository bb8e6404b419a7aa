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

import random
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


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors and plain tuples, so they load with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    n = st["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


class GlobalRng:
    """The process-wide RNGs (Python, NumPy, torch) as a resumable part of the run, seeded
    per rank (``seed * 1000 + rank``: dropout outside a step, shuffles of helper code).

    Per rank: after a world-size change it restarts from ``seed * 1000 + rank + step``."""

    per_rank = True

    def __init__(self, seed: int, rank: int):
        self.seed, self.rank = seed, rank
        seed_all(seed * 1000 + rank)

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)

    def restart(self, step: int) -> None:
        seed_all(self.seed * 1000 + self.rank + step)
