"""The webdataset reader: weighted, seeded shard streams with an exactly resumable position.

Why not a shuffle buffer: its contents are state that cannot be checkpointed cheaply.
Instead every worker reads ``open_shards`` shards at once and draws each next sample from
one of them at random.  Every random choice is a pure function of
(seed, rank, logical worker, counter), so a stream's whole state is a few integers:
samples drawn, shards picked, and for each open shard (pick index, offset).  Restoring
it re-opens those shards and skips ``offset`` raw samples (no decode), and the stream
continues with exactly the samples an uninterrupted run would have seen.

The DataLoader hands out worker batches round-robin; each batch carries its worker's
state, and the loader rotates the worker -> logical-stream map on resume so the next
batch comes from the right stream.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .transforms import SkipSample


@dataclass
class Source:
    name: str
    urls: list[str]
    weight: float


def expand_sources(spec: str, weights: list[float] | None = None) -> list[Source]:
    """'a/{000..009}.tar::b/{00..03}.tar' -> Sources; checks the shards exist (local paths)."""
    parts = [p.strip() for p in spec.split("::") if p.strip()]
    if not parts:
        raise ValueError("data.train_shards is empty")
    weights = list(weights or [1.0] * len(parts))
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} sources")
    out = []
    for part, w in zip(parts, weights):
        urls = list(braceexpand.braceexpand(part))
        missing = [u for u in urls if "://" not in u and not os.path.exists(u)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {part!r} are missing, "
                                    f"first: {missing[0]}")
        out.append(Source(os.path.basename(os.path.dirname(urls[0])) or part, urls, float(w)))
    return out


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def sample_seed(seed: int, rank: int, worker: int, epoch: int, drawn: int) -> int:
    """The seed of a sample's own random choices (augmentation): a pure function of where the
    sample sits in its stream, so a resumed stream draws exactly what the first one did."""
    return int(_rng(seed, rank, worker, 3, epoch, drawn).integers(2 ** 62))


def iter_raw_samples(url: str) -> Iterator[dict]:
    """Raw samples (suffix -> bytes) of one tar shard, in file order."""
    with open(url, "rb") as f:
        files = ({**d, "__url__": url} for d in tar_file_iterator(f))
        yield from group_by_keys(files)


class ShardStream:
    """One logical stream: (seed, rank, worker) -> an endless (resampled) or finite sequence
    of raw samples, with a state that can be saved after any sample."""

    def __init__(self, sources: list[Source], seed: int, rank: int, world: int, worker: int, workers: int,
                 resampled: bool, open_shards: int, epoch: int = 0, state: dict | None = None):
        self.sources, self.seed, self.rank, self.worker = sources, seed, rank, worker
        self.resampled, self.k = resampled, open_shards
        probs = np.array([s.weight for s in sources], dtype=np.float64)
        self.probs = probs / probs.sum()
        if not resampled:  # epoch mode: a fixed, seeded order of all shards, split by rank and worker
            flat = [(si, u) for si, s in enumerate(sources) for u in range(len(s.urls))]
            order = _rng(seed, 7919, epoch).permutation(len(flat)) if epoch >= 0 else np.arange(len(flat))
            stream_id, n_streams = rank * workers + worker, world * workers
            self.epoch_shards = [flat[i] for i in order[stream_id::n_streams]]
        st = state or {}
        self.drawn = st.get("drawn", 0)
        self.picks = st.get("picks", 0)
        self.dead_opens = 0
        self.slots: list[dict] = []  # each: {"pick", "offset", "iter", "src", "url"}
        for s in st.get("slots", []):
            self._open(s["pick"], s["offset"])
        self.skipped: collections.Counter = collections.Counter()

    # -- shard choice: a pure function of the pick counter ---------------------------------
    def _shard_of(self, pick: int) -> tuple[int, int] | None:
        if not self.resampled:
            return self.epoch_shards[pick] if pick < len(self.epoch_shards) else None
        r = _rng(self.seed, self.rank, self.worker, 1, pick)
        si = int(r.choice(len(self.sources), p=self.probs))
        return si, int(r.integers(len(self.sources[si].urls)))

    def _open(self, pick: int, offset: int = 0) -> bool:
        where = self._shard_of(pick)
        if where is None:
            return False
        si, ui = where
        url = self.sources[si].urls[ui]
        it = iter_raw_samples(url)
        slot = {"pick": pick, "offset": 0, "iter": it, "src": si, "url": url}
        self.dead_opens += 1  # reset by the first sample the shard yields
        for _ in range(offset):  # fast-forward without decoding
            if self._next_raw(slot) is None:
                break
        self.slots.append(slot)
        return True

    def _fill(self) -> None:
        while len(self.slots) < self.k:
            if self.dead_opens > max(64, 4 * sum(len(s.urls) for s in self.sources)):
                raise RuntimeError(f"no readable samples in {self.dead_opens} consecutive shard opens "
                                   f"(last: {self.slots[-1]['url'] if self.slots else '?'}); check data.train_shards")
            if not self._open(self.picks):
                if self.resampled:
                    continue
                return
            self.picks += 1

    def _next_raw(self, slot: dict) -> dict | None:
        try:
            raw = next(slot["iter"])
        except StopIteration:
            if slot["offset"] == 0:
                self.skipped["empty_shard"] += 1
            return None
        except Exception:  # truncated or unreadable tar: the shard's remainder is lost, counted
            self.skipped["unreadable_shard"] += 1
            return None
        slot["offset"] += 1
        self.dead_opens = 0
        return raw

    def __iter__(self) -> Iterator[tuple[dict, int]]:
        """Yields (raw sample, source index) forever (resampled) or until shards run out."""
        while True:
            self._fill()
            if not self.slots:
                return
            j = int(_rng(self.seed, self.rank, self.worker, 2, self.drawn).integers(len(self.slots)))
            self.drawn += 1
            slot = self.slots[j]
            raw = self._next_raw(slot)
            if raw is None:
                self.slots.pop(j)
                continue
            yield raw, slot["src"]

    def state(self) -> dict:
        return {"drawn": self.drawn, "picks": self.picks,
                "slots": [{"pick": s["pick"], "offset": s["offset"]} for s in self.slots]}


class WdsBatches(IterableDataset):
    """Batches decoded in workers.  Each batch carries ``_worker`` (logical stream id),
    ``_state`` (that stream's position after the batch) and cumulative counters."""

    def __init__(self, sources: list[Source], decode: Callable, collate: Callable, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, resampled: bool = True, open_shards: int = 4,
                 num_workers: int = 0, epoch: int = 0, drop_last: bool = True):
        self.drop_last = drop_last
        self.sources, self.decode, self.collate = sources, decode, collate
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.resampled, self.open_shards, self.num_workers, self.epoch = resampled, open_shards, num_workers, epoch
        self.rotation = 0
        self.resume: dict[int, dict] = {}

    def __iter__(self):
        info = get_worker_info()
        workers = max(1, self.num_workers)
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % workers
        saved = self.resume.get(logical, {})
        stream = ShardStream(self.sources, self.seed, self.rank, self.world, logical, workers, self.resampled,
                             self.open_shards, self.epoch, saved.get("stream"))
        skipped = collections.Counter(saved.get("skipped", {}))
        per_source = collections.Counter(saved.get("per_source", {}))
        names = [s.name for s in self.sources]
        buf: list[dict] = []
        bad_run = 0

        def position() -> dict:  # this stream's resumable state plus its cumulative counters
            return {"stream": stream.state(), "skipped": dict(skipped), "per_source": dict(per_source)}
        for raw, src in stream:
            raw["__seed__"] = sample_seed(self.seed, self.rank, logical, self.epoch, stream.drawn)
            try:
                buf.append(self.decode(raw))
                bad_run = 0
            except SkipSample as e:
                skipped[e.reason] += 1
                bad_run += 1
                if bad_run >= 10_000:
                    raise RuntimeError(f"10000 consecutive samples skipped (last reason {e.reason!r}, shard "
                                       f"{raw.get('__url__')}): the data does not match train.task/data settings")
                continue
            per_source[names[src]] += 1
            if len(buf) == self.batch_size:
                batch = self.collate(buf)
                buf = []
                skipped.update(stream.skipped)
                stream.skipped.clear()
                batch["_worker"] = logical
                batch["_state"] = position()
                yield batch
        # the stream ended (epoch mode): the tail batch (evaluation only; training drops it so
        # ranks agree on step counts), then a sample-less marker carrying the final counters
        skipped.update(stream.skipped)
        final = position()
        if buf and not self.drop_last:
            yield {**self.collate(buf), "_worker": logical, "_state": final}
        yield {"_worker": logical, "_state": final, "_end": True}


def _worker_ignores_stop_signals(_worker_id: int) -> None:
    """SLURM signals every process of a step, workers included; torch's worker handler would
    die on SIGTERM and take the rank down before it can checkpoint.  The main process
    decides (``train.StopSignal``) and shuts the workers down itself."""
    import signal
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


class ResumableLoader:
    """DataLoader wrapper that records the position of every batch handed out and can
    restart from it; ``state_dict`` goes into the checkpoint."""

    def __init__(self, dataset: WdsBatches, pin_memory: bool = False, repeat: bool = False):
        self.ds = dataset
        self.pin = pin_memory
        self.repeat = repeat
        self.epoch = dataset.epoch
        self.workers_state: dict[int, dict] = {}
        self.next_worker = 0
        self.batches = 0

    def __iter__(self):
        """Batches from the saved position on.  In epoch mode with ``repeat`` (training),
        the next epoch (a new seeded shard order) follows when one ends."""
        nw = self.ds.num_workers
        while True:
            self.ds.rotation = self.next_worker
            self.ds.resume = dict(self.workers_state)
            self.ds.epoch = self.epoch
            # a generator of its own: a new iterator must not draw its worker seeds from the global
            # RNG (every random choice of the stream is seeded by its position anyway)
            loader = DataLoader(self.ds, batch_size=None, num_workers=nw, pin_memory=self.pin,
                                persistent_workers=False, prefetch_factor=4 if nw else None,
                                multiprocessing_context="fork" if nw else None,
                                worker_init_fn=_worker_ignores_stop_signals if nw else None,
                                generator=torch.Generator().manual_seed(self.ds.seed))
            for batch in loader:
                w = batch.pop("_worker")
                self.workers_state[w] = batch.pop("_state")
                if batch.pop("_end", False):
                    continue
                self.next_worker = (w + 1) % max(1, nw)
                self.batches += 1
                yield batch
            if not self.repeat or self.ds.resampled:
                return
            self.epoch += 1
            self.workers_state, self.next_worker = {}, 0

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """(skipped samples by reason, samples seen per source), summed over streams."""
        skipped, seen = collections.Counter(), collections.Counter()
        for st in self.workers_state.values():
            skipped.update(st["skipped"])
            seen.update(st["per_source"])
        return dict(skipped), dict(seen)

    def state_dict(self) -> dict:
        return {"workers": {str(k): v for k, v in self.workers_state.items()}, "next_worker": self.next_worker,
                "batches": self.batches, "num_workers": self.ds.num_workers, "epoch": self.epoch}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("num_workers") != self.ds.num_workers:
            raise ValueError(f"the data position was saved with data.num_workers={sd.get('num_workers')}; "
                             f"resume with the same value (now {self.ds.num_workers}) to continue exactly")
        self.workers_state = {int(k): v for k, v in sd["workers"].items()}
        self.next_worker, self.batches, self.epoch = sd["next_worker"], sd["batches"], sd.get("epoch", 0)


def answer_list(cfg) -> list[str]:
    """The VQA answer vocabulary of a RunConfig (data.answer_vocab, or the demo's answers),
    checked against data.num_answers."""
    import json
    from .demo import ANSWERS
    if cfg.data.answer_vocab:
        with open(cfg.data.answer_vocab) as f:
            answers = json.load(f)
    else:
        answers = list(ANSWERS)
    if len(answers) != cfg.data.num_answers:
        raise ValueError(f"data.answer_vocab has {len(answers)} answers but data.num_answers="
                         f"{cfg.data.num_answers}")
    return answers


def geometry(cfg):
    """The image geometry of a RunConfig (``data.image_*`` and the student's patch size)."""
    from .transforms import Geometry
    d = cfg.data
    return Geometry(d.image_resize, d.image_shorter, d.image_longer, cfg.student.arch.patch_size)


def build_loader(cfg, split: str = "train", rank: int = 0, world: int = 1, batch_size: int | None = None,
                 task: str | None = None) -> ResumableLoader:
    """The train (resampled, rank-split) or evaluation (one ordered pass, every rank reads
    the whole split) loader of a RunConfig."""
    from .transforms import Collate, RandAugment, SampleDecoder
    task = task or cfg.train.task
    answers = answer_list(cfg) if task == "vqa" else None
    geo = geometry(cfg)
    d = cfg.data
    augment = RandAugment(d.randaugment_ops, d.randaugment_magnitude) if d.randaugment_ops and split == "train" \
        else None
    decode = SampleDecoder(task, geo, d.max_image_pixels, answers, draft=d.jpeg_draft, augment=augment)
    collate = Collate(d.tokenizer, cfg.student.arch.max_text_len, geo.max_patches)
    bs = batch_size or cfg.train.micro_batch_size
    if split == "train":
        sources = expand_sources(d.train_shards, d.train_weights or None)
        ds = WdsBatches(sources, decode, collate, bs, cfg.train.seed, rank, world, d.resampled,
                        d.open_shards, d.num_workers)
        return ResumableLoader(ds, pin_memory=torch.cuda.is_available(), repeat=True)
    else:
        sources = expand_sources(d.val_shards)
        ds = WdsBatches(sources, decode, collate, bs, cfg.train.seed, 0, 1, False, 1,
                        min(d.num_workers, sum(len(s.urls) for s in sources)), epoch=-1, drop_last=False)
    return ResumableLoader(ds)
