"""The webdataset reader: weighted, seeded shard streams with an exactly resumable position.

Why not a shuffle buffer: its contents are state that cannot be checkpointed cheaply.
Instead every worker reads ``open_shards`` pieces of shards at once and draws each next
sample from one of them at random.  Every random choice is a pure function of
(seed, rank, logical worker, counter), so a stream's whole state is a few integers:
samples drawn, pieces picked, and for each open piece (pick index, samples read).
Restoring it re-opens those pieces and skips what was read (no decode), and the stream
continues with exactly the samples an uninterrupted run would have seen.

* Resampled (pre-training): each pick is a shard chosen by the sources' weights, read
  from a seeded offset round to the same offset (so two streams that open one shard do not
  read it in step, which would put the same pairs twice in a global batch).
* Epoch mode (fine-tuning): the epoch's seeded shard order is one sequence of samples
  (``sizes.json`` gives the counts), cut into one equal run per stream (world size x
  workers), so every rank sees the same number of samples per epoch and every stream has
  work, whatever the shard count.

Shards can live anywhere ``data.remote`` opens (local, http(s), s3, gs, ``pipe:``).  Where
``sizes.json`` holds each sample's byte offset, a piece that starts (or resumes, or is
retried) at sample k is opened at that sample's byte, by a seek or a range request;
without offsets the shard is read from its start and the samples before k skipped (read,
not decoded).  A read that fails with a passing error is retried from where it stopped
(``ReadPolicy``), counted in ``data/retries``; a shard that keeps failing is skipped and
counted (``data/skipped/unreadable_shard``); a source whose shards all fail ends the run
with an error naming it (:class:`SourceUnreadable`).

The DataLoader hands out worker batches round-robin; each batch carries its worker's
state, and the loader rotates the worker -> logical-stream map on resume so the next
batch comes from the right stream.  The loader waits for data in short polls, so a stop
signal during a wait is seen (:class:`DataWaitInterrupted`) and a wait longer than
``data.stall_timeout_s`` ends the run naming the shards its workers read (:class:`DataStalled`).
"""
from __future__ import annotations

import collections
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from ..labels import answer_list
from .remote import READ_TIMEOUT_S, is_local, is_pipe, open_shard, pipe_sibling, probe, read_json, shard_name, transient
from .shards import SIZES, split_sizes, suggest_pattern
from .transforms import CaptionMasking, Collate, Geometry, RandAugment, SampleDecoder, SkipSample, load_tokenizer


class SourceUnreadable(RuntimeError):
    """Every shard of a source failed to read."""


class DataStalled(RuntimeError):
    """No batch arrived for ``data.stall_timeout_s``."""


class DataWaitInterrupted(Exception):
    """A stop signal arrived while the loader was waiting for data."""


@dataclass
class Source:
    name: str
    urls: list[str]
    weight: float
    sizes: list[int] | None = None
    """Samples per shard (the directory's sizes.json), when known."""
    offsets: list[list[int] | None] | None = None
    """Per shard, the byte offset of each sample (sizes.json's ``__offsets__``), when known."""


def _sizes_url(url: str) -> str | None:
    """Where the sizes.json beside a shard is read from (for ``pipe:``, the same command on
    it), or None when that cannot be told."""
    if is_pipe(url):
        return pipe_sibling(url, SIZES)
    return f"{url.rsplit('/', 1)[0]}/{SIZES}" if "/" in url else SIZES


def _index_of(urls: list[str]) -> tuple[list[int] | None, list[list[int] | None] | None]:
    """(sample counts, per-sample byte offsets) of ``urls`` from the sizes.json beside them
    (local, remote or through the ``pipe:`` command); counts None unless every shard has
    one.  A sizes.json that exists but cannot be read raises (``read_json``): every rank
    must see the same counts, or their streams would differ."""
    docs: dict[str, tuple[dict, dict]] = {}
    sizes, offsets = [], []
    for u in urls:
        where = _sizes_url(u)
        if where is None:
            return None, None
        if where not in docs:
            docs[where] = split_sizes(read_json(where))
        counts, offs = docs[where]
        name = shard_name(u)
        if name not in counts:
            return None, None
        sizes.append(counts[name])
        offsets.append(offs.get(name))
    return sizes, (offsets if any(o is not None for o in offsets) else None)


def expand_sources(spec: str, weights: list[float] | None = None) -> list[Source]:
    """'a/{000..009}.tar::b/{00..03}.tar' -> Sources, with their sizes.json counts when there
    are any; local shards must exist (remote ones are probed by the trainer's preflight)."""
    parts = [p.strip() for p in spec.split("::") if p.strip()]
    if not parts:
        raise ValueError("data.train_shards is empty")
    weights = list(weights or [1.0] * len(parts))
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} sources")
    out = []
    for part, w in zip(parts, weights):
        # pipe: commands are expanded here too: the shell that runs one (sh) does not expand
        # braces, and one command for every shard would read only the first
        urls = list(braceexpand.braceexpand(part))
        check_local_shards(part, urls)
        name = os.path.basename(os.path.dirname(urls[0])) if not is_pipe(part) else ""
        out.append(Source(name or part, urls, float(w), *_index_of(urls)))
    return out


def check_local_shards(part: str, urls: list[str]) -> None:
    """Local shards must be files: a folder, a shell glob (not expanded here) or a missing
    file is refused in one line that shows the brace form naming the shards."""
    local = [u for u in urls if is_local(u)]
    folder = next((u for u in local if os.path.isdir(u)), None)
    if folder is not None:
        raise ValueError(f"{folder} is a folder, not a shard: name its shards with a brace range, "
                         f"e.g. {suggest_pattern(folder)}")
    missing = [u for u in local if not os.path.exists(u)]
    if missing and any(c in part for c in "*?["):
        raise FileNotFoundError(f"{part!r}: shell globs are not expanded; name the shards with a brace range, "
                                f"e.g. {suggest_pattern(os.path.dirname(part) or '.')}")
    if len(urls) == 1 and missing:
        raise FileNotFoundError(f"{missing[0]}: no such shard file")
    if len(missing) == len(urls):
        raise FileNotFoundError(f"all {len(urls)} shards of {part!r} are missing, first: {missing[0]}")
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {part!r} are missing, first: {missing[0]}")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def sample_seed(seed: int, rank: int, worker: int, epoch: int, drawn: int) -> int:
    """The seed of a sample's own random choices (augmentation): a pure function of where the
    sample sits in its stream, so a resumed stream draws exactly what the first one did."""
    return int(_rng(seed, rank, worker, 3, epoch, drawn).integers(2 ** 62))


def iter_raw_samples(url: str, timeout_s: float = READ_TIMEOUT_S, offset: int = 0) -> Iterator[dict]:
    """Raw samples (suffix -> bytes) of one tar shard, in file order, from byte ``offset``
    (a sample's first header)."""
    stream = open_shard(url, timeout_s, offset)
    try:
        files = ({**d, "__url__": url} for d in tar_file_iterator(stream))
        yield from group_by_keys(files)
    finally:
        stream.close()


def read_piece(url: str, start: int, skip: int, length: int | None, size: int | None,
               timeout_s: float = READ_TIMEOUT_S, offsets: list[int] | None = None) -> Iterator[dict]:
    """Samples ``skip, skip + 1, ...`` of a piece of a shard: ``length`` samples from position
    ``start``, wrapping round to the shard's beginning at its end (a shard of ``size``
    samples read from ``start`` back to ``start``); ``length=None`` reads to the end.  With
    the shard's sample ``offsets`` the read starts at the first sample wanted; without,
    at the shard's start, and the samples before it are read but not decoded."""
    k = skip
    for first_pass in (True, False):
        if not first_pass and (size is None or length is None or k >= length):
            return
        pos = start + k if first_pass else (start + k) - size
        if first_pass and size is not None and pos >= size:
            continue  # already in the wrapped part
        first = pos if offsets is not None and pos < len(offsets) else 0
        byte = offsets[first] if first else 0
        for i, raw in enumerate(iter_raw_samples(url, timeout_s, byte), start=first):
            if i < pos:
                continue
            if length is not None and k >= length:
                return
            yield raw
            k += 1


@dataclass(frozen=True)
class ReadPolicy:
    """How hard a stream tries to read a shard (picklable: it runs in the workers)."""

    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = READ_TIMEOUT_S

    def delay(self, attempt: int) -> float:
        return min(30.0, self.backoff_s * 2 ** (attempt - 1))


def epoch_pieces(sources: list[Source], seed: int, epoch: int, stream_id: int, n_streams: int
                 ) -> list[tuple[int, int, int, int | None]]:
    """One stream's share of an epoch: [(source, shard, start, length), ...].  With sample
    counts, the epoch's seeded shard order is one sequence cut into ``n_streams`` equal runs
    (the remainder, fewer than ``n_streams`` samples, waits for the next epoch's order);
    without, whole shards are dealt round-robin (counts may then differ between streams).
    ``epoch < 0``: one ordered pass, whole shards dealt round-robin (evaluation)."""
    flat = [(si, ui) for si, s in enumerate(sources) for ui in range(len(s.urls))]
    order = _rng(seed, 7919, epoch).permutation(len(flat)) if epoch >= 0 else np.arange(len(flat))
    known = all(s.sizes is not None for s in sources)
    if epoch < 0 or not known:
        return [(*flat[i], 0, None) for i in order[stream_id::n_streams]]
    per = sum(sum(s.sizes) for s in sources) // n_streams
    lo, hi = stream_id * per, (stream_id + 1) * per
    pieces, c = [], 0
    for i in order:
        si, ui = flat[i]
        n = sources[si].sizes[ui]
        b, e = max(lo, c), min(hi, c + n)
        if b < e:
            pieces.append((si, ui, b - c, e - b))
        c += n
        if c >= hi:
            break
    return pieces


class ShardStream:
    """One logical stream: (seed, rank, worker) -> an endless (resampled) or finite sequence
    of raw samples, with a state that can be saved after any sample.  ``offsets=False``
    starts every resampled piece at the shard's beginning (the reader before seeded
    offsets; kept for measuring what they change)."""

    def __init__(self, sources: list[Source], seed: int, rank: int, world: int, worker: int, workers: int,
                 resampled: bool, open_shards: int, epoch: int = 0, state: dict | None = None,
                 policy: ReadPolicy = ReadPolicy(), offsets: bool = True, on_open: Callable | None = None,
                 pieces: list[tuple] | None = None):
        self.sources, self.seed, self.rank, self.worker = sources, seed, rank, worker
        self.resampled, self.k, self.policy, self.offsets = resampled, open_shards, policy, offsets
        self.on_open = on_open
        probs = np.array([s.weight for s in sources], dtype=np.float64)
        self.probs = probs / probs.sum()
        if not resampled:
            stream_id, n_streams = rank * workers + worker, world * workers
            self.pieces = pieces[stream_id::n_streams] if pieces is not None else \
                epoch_pieces(sources, seed, epoch, stream_id, n_streams)
        st = state or {}
        self.drawn = st.get("drawn", 0)
        self.picks = st.get("picks", 0)
        self.dead_opens = 0
        self.failed_in_a_row = collections.Counter()  # per source: pieces that failed, none read since
        self.last_error: dict[int, tuple[str, str]] = {}
        self.retries = 0
        self.skipped: collections.Counter = collections.Counter()
        self.slots: list[dict] = []  # each: {"pick", "read", "iter", "src", "url", "piece", "failures"}
        for s in st.get("slots", []):
            self._open(s["pick"], s.get("read", s.get("offset", 0)))

    # -- which piece: a pure function of the pick counter ----------------------------------
    def _piece(self, pick: int) -> tuple[int, int, int, int | None] | None:
        if not self.resampled:
            return self.pieces[pick] if pick < len(self.pieces) else None
        r = _rng(self.seed, self.rank, self.worker, 1, pick)
        si = int(r.choice(len(self.sources), p=self.probs))
        ui = int(r.integers(len(self.sources[si].urls)))
        sizes = self.sources[si].sizes
        if sizes is None:
            return si, ui, 0, None
        start = int(r.integers(sizes[ui])) if self.offsets and sizes[ui] else 0
        return si, ui, start, sizes[ui]

    def _reader(self, slot: dict) -> Iterator[dict]:
        si, ui, start, length = slot["piece"]
        src = self.sources[si]
        size = src.sizes[ui] if src.sizes is not None and self.resampled else None
        offsets = src.offsets[ui] if src.offsets is not None else None
        return read_piece(slot["url"], start, slot["read"], length, size, self.policy.timeout_s, offsets)

    def _open(self, pick: int, read: int = 0) -> bool:
        piece = self._piece(pick)
        if piece is None:
            return False
        si, ui = piece[:2]
        slot = {"pick": pick, "read": read, "src": si, "url": self.sources[si].urls[ui], "piece": piece,
                "failures": 0, "got": False}
        slot["iter"] = self._reader(slot)
        self.dead_opens += 1  # reset by the first sample the piece yields
        self.slots.append(slot)
        if self.on_open is not None:
            self.on_open([s["url"] for s in self.slots])
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
        while True:
            try:
                raw = next(slot["iter"])
            except StopIteration:
                if not slot["got"] and slot["read"] == 0:
                    self.skipped["empty_shard"] += 1
                return None
            except Exception as e:  # noqa: BLE001 - classified below; the stream must go on
                if transient(e, slot["url"]) and slot["failures"] < self.policy.retries:
                    slot["failures"] += 1
                    self.retries += 1
                    time.sleep(self.policy.delay(slot["failures"]))
                    slot["iter"] = self._reader(slot)  # from where it stopped
                    continue
                self._failed(slot, e)
                return None
            slot["read"] += 1
            slot["got"], slot["failures"] = True, 0
            self.dead_opens = 0
            self.failed_in_a_row[slot["src"]] = 0
            return raw

    def _failed(self, slot: dict, e: BaseException) -> None:
        """A piece that cannot be read: skipped and counted; a source that fails every time ends
        the run with an error naming it."""
        self.skipped["unreadable_shard"] += 1
        src = slot["src"]
        self.last_error[src] = (slot["url"], f"{type(e).__name__}: {e}")
        if slot["got"]:
            return  # it gave samples before it broke (a truncated shard): the source is readable
        self.failed_in_a_row[src] += 1
        source = self.sources[src]
        if self.failed_in_a_row[src] >= min(len(source.urls), 8):
            url, err = self.last_error[src]
            raise SourceUnreadable(f"no shard of source {source.name!r} ({len(source.urls)} shards) can be read: "
                                   f"{self.failed_in_a_row[src]} failed in a row, the last {url} with {err}")

    def __iter__(self) -> Iterator[tuple[dict, int]]:
        """Yields (raw sample, source index) forever (resampled) or until pieces run out."""
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
                "slots": [{"pick": s["pick"], "read": s["read"]} for s in self.slots]}


class WdsBatches(IterableDataset):
    """Batches decoded in workers.  Each batch carries ``_worker`` (logical stream id),
    ``_state`` (that stream's position after the batch) and cumulative counters.  With a
    ``status_dir``, each worker keeps ``rank{R}_worker{W}.json`` there naming the shards it
    is reading (what a stalled run reports)."""

    def __init__(self, sources: list[Source], decode: Callable, collate: Callable, batch_size: int, seed: int,
                 rank: int = 0, world: int = 1, resampled: bool = True, open_shards: int = 4,
                 num_workers: int = 0, epoch: int = 0, drop_last: bool = True, policy: ReadPolicy = ReadPolicy(),
                 status_dir: str | None = None, offsets: bool = True, pieces: list[tuple] | None = None,
                 stride: tuple[int, int] = (0, 1)):
        self.drop_last = drop_last
        self.pieces, self.stride = pieces, stride  # evaluation shares (eval_split)
        self.sources, self.decode, self.collate = sources, decode, collate
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.resampled, self.open_shards, self.num_workers, self.epoch = resampled, open_shards, num_workers, epoch
        self.policy, self.status_dir, self.offsets = policy, status_dir, offsets
        self.rotation = 0
        self.resume: dict[int, dict] = {}

    def status_file(self, logical: int) -> Path | None:
        return None if self.status_dir is None else Path(self.status_dir) / f"rank{self.rank}_worker{logical}.json"

    def _report(self, logical: int, urls: list[str]) -> None:
        f = self.status_file(logical)
        if f is not None:
            tmp = f.with_suffix(".tmp")
            tmp.write_text(json.dumps({"rank": self.rank, "worker": logical, "pid": os.getpid(),
                                       "since": time.time(), "reading": urls}))
            os.replace(tmp, f)

    def __iter__(self):
        info = get_worker_info()
        workers = max(1, self.num_workers)
        physical = info.id if info is not None else 0
        logical = (physical + self.rotation) % workers
        saved = self.resume.get(logical, {})
        if self.status_dir is not None:
            os.makedirs(self.status_dir, exist_ok=True)
        stream = ShardStream(self.sources, self.seed, self.rank, self.world, logical, workers, self.resampled,
                             self.open_shards, self.epoch, saved.get("stream"), self.policy, self.offsets,
                             on_open=lambda urls: self._report(logical, urls), pieces=self.pieces)
        keep, every = self.stride
        skipped = collections.Counter(saved.get("skipped", {}))
        per_source = collections.Counter(saved.get("per_source", {}))
        retries0 = saved.get("retries", 0)
        names = [s.name for s in self.sources]
        buf: list[dict] = []
        bad_run = 0

        def position() -> dict:  # this stream's resumable state plus its cumulative counters
            return {"stream": stream.state(), "skipped": dict(skipped), "per_source": dict(per_source),
                    "retries": retries0 + stream.retries}
        for raw, src in stream:
            if every > 1 and (stream.drawn - 1) % every != keep:  # another rank's sample: not decoded
                continue
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


def _stop_workers(it) -> None:
    """Shut a DataLoader iterator's workers down now, whatever they are doing: PyTorch asks them
    to stop and then sends SIGTERM, which ours ignore (see ``_worker_ignores_stop_signals``),
    and one blocked in a read of a server that does not answer would otherwise outlive the
    loader and keep its process from exiting."""
    workers = getattr(it, "_workers", [])
    if any(w.is_alive() for w in workers):
        if getattr(it, "_worker_pids_set", False):  # PyTorch's SIGCHLD watch would report the kill as a crash
            from torch.utils.data import _utils
            _utils.signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
        for w in workers:  # they hold no state worth flushing: the position travels with the batches
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # queues and the pin-memory thread


class ResumableLoader:
    """DataLoader wrapper that records the position of every batch handed out and can
    restart from it; ``state_dict`` goes into the checkpoint.

    With workers, it waits for each batch in polls of ``poll_s`` seconds: between polls it
    asks ``interrupt()`` (the trainer's stop flag) and raises :class:`DataWaitInterrupted`
    when it is set, and after ``stall_timeout_s`` without a batch it raises
    :class:`DataStalled`, naming what the workers are reading."""

    def __init__(self, dataset: WdsBatches, pin_memory: bool = False, repeat: bool = False,
                 stall_timeout_s: float = 0.0, poll_s: float = 2.0, interrupt: Callable[[], bool] | None = None):
        self.ds = dataset
        self.pin = pin_memory
        self.repeat = repeat
        self.stall_timeout_s, self.poll_s, self.interrupt = stall_timeout_s, poll_s, interrupt
        self.epoch = dataset.epoch
        self.workers_state: dict[int, dict] = {}
        self.next_worker = 0
        self.batches = 0

    def _next(self, it) -> dict:
        """The next batch from a DataLoader iterator, waiting in polls (see the class doc)."""
        polls = bool(self.ds.num_workers) and (self.stall_timeout_s > 0 or self.interrupt is not None)
        waited = 0.0
        while True:
            try:
                return next(it)
            except RuntimeError as e:
                if not polls or "timed out" not in str(e):
                    raise
            waited += self.poll_s
            if self.interrupt is not None and self.interrupt():
                raise DataWaitInterrupted(f"a stop signal arrived while waiting {waited:.0f} s for data")
            if self.stall_timeout_s and waited >= self.stall_timeout_s:
                raise DataStalled(self.stall_report(waited))

    def stall_report(self, waited: float) -> str:
        lines = [f"no batch for {waited:.0f} s (data.stall_timeout_s={self.stall_timeout_s:g}) on rank {self.ds.rank}"]
        for w in range(max(1, self.ds.num_workers)):
            f = self.ds.status_file(w)
            if f is not None and f.exists():
                st = json.loads(f.read_text())
                lines.append(f"  worker {w} (pid {st['pid']}) is reading {', '.join(st['reading']) or 'nothing'} "
                             f"(opened {time.time() - st['since']:.0f} s ago)")
        if len(lines) == 1:
            lines.append("  (no worker status: the reader has no status directory)")
        return "\n".join(lines)

    def __iter__(self):
        """Batches from the saved position on.  In epoch mode with ``repeat`` (training),
        the next epoch (a new seeded shard order) follows when one ends."""
        nw = self.ds.num_workers
        polls = bool(nw) and (self.stall_timeout_s > 0 or self.interrupt is not None)
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
                                generator=torch.Generator().manual_seed(self.ds.seed),
                                timeout=self.poll_s if polls else 0)
            it = iter(loader)
            try:
                while True:
                    try:
                        batch = self._next(it)
                    except StopIteration:
                        break
                    w = batch.pop("_worker")
                    self.workers_state[w] = batch.pop("_state")
                    if batch.pop("_end", False):
                        continue
                    self.next_worker = (w + 1) % max(1, nw)
                    self.batches += 1
                    yield batch
            finally:
                _stop_workers(it)
            if not self.repeat or self.ds.resampled:
                return
            self.epoch += 1
            self.workers_state, self.next_worker = {}, 0

    def counters(self) -> tuple[dict[str, int], dict[str, int], int]:
        """(skipped samples by reason, samples seen per source, read retries), summed over streams."""
        skipped, seen = collections.Counter(), collections.Counter()
        retries = 0
        for st in self.workers_state.values():
            skipped.update(st["skipped"])
            seen.update(st["per_source"])
            retries += st.get("retries", 0)
        return dict(skipped), dict(seen), retries

    def state_dict(self) -> dict:
        return {"workers": {str(k): v for k, v in self.workers_state.items()}, "next_worker": self.next_worker,
                "batches": self.batches, "num_workers": self.ds.num_workers, "epoch": self.epoch}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("num_workers") != self.ds.num_workers:
            raise ValueError(f"the data position was saved with data.num_workers={sd.get('num_workers')}; "
                             f"resume with the same value (now {self.ds.num_workers}) to continue exactly")
        self.workers_state = {int(k): v for k, v in sd["workers"].items()}
        self.next_worker, self.batches, self.epoch = sd["next_worker"], sd["batches"], sd.get("epoch", 0)


def geometry(cfg):
    """The image geometry of a RunConfig (``data.image_*`` and the student's patch size)."""
    d = cfg.data
    return Geometry(d.image_resize, d.image_shorter, d.image_longer, cfg.student.arch.patch_size)


def check_streams(sources: list[Source], cfg, world: int, train: bool = True) -> None:
    """Fail before any process starts: a remote source whose first shard does not answer
    (naming the URL), or, in epoch mode, shards without sample counts or too few samples to
    give each of the world size x data.num_workers streams a batch per epoch."""
    for s in sources:
        if not is_local(s.urls[0]):
            problem = probe(s.urls[0], min(cfg.data.read_timeout_s, 30.0))
            if problem:
                raise FileNotFoundError(f"source {s.name!r}: its first shard {s.urls[0]} does not answer ({problem})")
    if not train or cfg.data.resampled:
        return
    streams = world * max(1, cfg.data.num_workers)
    unsized = [s.name for s in sources if s.sizes is None]
    if unsized:
        raise ValueError(f"epoch mode (data.resampled=false) cuts each epoch into equal runs of samples, one per "
                         f"stream, and needs every shard's sample count: {unsized} have no sizes.json beside their "
                         "shards (`dide-data img2dataset DIR` writes one)")
    total = sum(sum(s.sizes) for s in sources)
    per = total // streams
    if per < cfg.train.micro_batch_size:
        raise ValueError(f"epoch mode: {total} samples over {streams} streams ({world} ranks x "
                         f"data.num_workers={cfg.data.num_workers}) give each stream {per}, fewer than one "
                         f"micro-batch (train.micro_batch_size={cfg.train.micro_batch_size}): use fewer workers")


def read_policy(cfg) -> ReadPolicy:
    d = cfg.data
    return ReadPolicy(d.read_retries, d.retry_backoff_s, d.read_timeout_s)


def build_loader(cfg, split: str = "train", rank: int = 0, world: int = 1, batch_size: int | None = None,
                 task: str | None = None, status_dir: str | None = None,
                 interrupt: Callable[[], bool] | None = None, exclusive: bool = False) -> ResumableLoader:
    """The train loader (resampled or epochs, split over ranks) or the evaluation loader (one
    ordered pass over this rank's share of the split's shards; ``exclusive``: no shard on two
    ranks, see ``eval_split``) of a RunConfig."""
    task = task or cfg.train.task
    masking = caption_masking(cfg) if task == "caption" and split == "train" else None
    answers = answer_list(cfg) if task == "vqa" else None
    geo = geometry(cfg)
    d = cfg.data
    augment = RandAugment(d.randaugment_ops, d.randaugment_magnitude) if d.randaugment_ops and split == "train" \
        else None
    decode = SampleDecoder(task, geo, d.max_image_pixels, answers, draft=d.jpeg_draft, augment=augment)
    collate = Collate(d.tokenizer, cfg.student.arch.max_text_len, geo.max_patches, masking)
    bs = batch_size or cfg.train.micro_batch_size
    if split == "train":
        sources = expand_sources(d.train_shards, d.train_weights or None)
        ds = WdsBatches(sources, decode, collate, bs, cfg.train.seed, rank, world, d.resampled,
                        d.open_shards, d.num_workers, policy=read_policy(cfg), status_dir=status_dir)
        return ResumableLoader(ds, pin_memory=torch.cuda.is_available(), repeat=True,
                               stall_timeout_s=d.stall_timeout_s, interrupt=interrupt)
    sources, pieces, stride = eval_split(expand_sources(d.val_shards), rank, world, exclusive)
    units = len(pieces) if pieces is not None else sum(len(s.urls) for s in sources)
    ds = WdsBatches(sources, decode, collate, bs, cfg.train.seed, 0, 1, False, 1, min(d.num_workers, units),
                    epoch=-1, drop_last=False, policy=read_policy(cfg), pieces=pieces, stride=stride)
    return ResumableLoader(ds, stall_timeout_s=d.stall_timeout_s)


def eval_split(sources: list[Source], rank: int, world: int, exclusive: bool = False
               ) -> tuple[list[Source], list[tuple] | None, tuple[int, int]]:
    """This rank's share of an evaluation split, every sample in exactly one rank's share (the
    metrics are summed over ranks afterwards): (sources, pieces, stride) for ``WdsBatches``.
    With at least as many shards as ranks, every ``world``-th shard; with fewer, a
    contiguous run of about 1/world of the samples (read from its first sample's offset),
    or, without sample counts, every shard read through and every ``world``-th sample kept.
    ``exclusive`` (retrieval, whose splits keep an image's captions together in one shard):
    whole shards only, the ranks past the shard count reading nothing."""
    if world == 1 or exclusive or sum(len(s.urls) for s in sources) >= world:
        return eval_share(sources, rank, world), None, (0, 1)
    if any(s.sizes is None for s in sources):
        return sources, None, (rank, world)
    return sources, sample_run(sources, rank, world), (0, 1)


def eval_share(sources: list[Source], rank: int, world: int) -> list[Source]:
    """This rank's shards of an evaluation split: every ``world``-th one."""
    if world == 1:
        return sources
    out, i = [], 0
    for s in sources:
        keep = [j for j in range(len(s.urls)) if (i + j) % world == rank]
        i += len(s.urls)
        if keep:
            out.append(Source(s.name, [s.urls[j] for j in keep], s.weight,
                              None if s.sizes is None else [s.sizes[j] for j in keep],
                              None if s.offsets is None else [s.offsets[j] for j in keep]))
    return out


def sample_run(sources: list[Source], rank: int, world: int) -> list[tuple[int, int, int, int]]:
    """Rank ``rank``'s contiguous run of the split's samples in order, as pieces (source,
    shard, start, length): ``world`` runs that differ by at most one sample."""
    total = sum(sum(s.sizes) for s in sources)
    lo = rank * (total // world) + min(rank, total % world)
    hi = lo + total // world + (rank < total % world)
    pieces, c = [], 0
    for si, s in enumerate(sources):
        for ui, n in enumerate(s.sizes):
            b, e = max(lo, c), min(hi, c + n)
            if b < e:
                pieces.append((si, ui, b - c, e - b))
            c += n
    return pieces


def caption_masking(cfg):
    """The training split's caption-token masking of a RunConfig (``caption.mask_prob`` /
    ``caption.max_masked``, the tokenizer's [MASK] and size)."""
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.mask_token_id is None:
        raise ValueError(f"data.tokenizer={cfg.data.tokenizer!r} has no [MASK] token: masked caption training "
                         "needs one")
    return CaptionMasking(cfg.caption.mask_prob, cfg.caption.max_masked, tok.mask_token_id, len(tok))
