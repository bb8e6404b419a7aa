"""Checkpoints: the one module that saves, finds, validates, resumes and purges them.

Layout of a run directory::

    checkpoints/
      step_00000100/            DeepSpeed sharded checkpoint of the student (all ranks)
        ...                     (DeepSpeed's own files)
        dide_rank00000.pt       this project's state (weights_only-loadable): every rank
                                its own parts (data position, RNG streams); rank 0's also
                                the parts that are the same on every rank (counters, best
                                score, token queue), which no other rank writes again
        COMPLETE.json           written last, by rank 0, after every rank finished: a
                                manifest of every file and its size, each file's size
                                reported by the rank that wrote it (another node's stat()
                                of a file just written can be stale on NFS)
      latest                    tag of the newest complete checkpoint (atomic rename)

A checkpoint without ``COMPLETE.json``, or whose files do not match its manifest, is
reported and skipped in favour of the previous one; the ranks agree on the one they resume
from (a checkpoint that any rank fails to verify or load is skipped by all).  Before any
rank calls DeepSpeed, every rank reads and unpickles the files it will load and the ranks
agree that all could: a rank whose files fail (ESTALE, EIO, a corrupt shard) must not be
voting on the CPU group while the others sit in a collective inside DeepSpeed's load.
Each rank only stats and reads its own files and the shared ones, so the cost per rank
does not grow with the world size.  The teacher is never saved.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Protocol

import torch

from .distributed import all_ranks, barrier, gather_objects, rank, rank0_decides, world_size
from .fsutil import atomic_write_text
from .lease import LeaseLost

log = logging.getLogger("dide_scale.checkpoint")
COMPLETE = "COMPLETE.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def file_names(d: Path) -> list[str]:
    """Every file under ``d`` (relative names, sorted), from directory listings alone (no
    stat() per file)."""
    out = []
    for root, _, files in os.walk(d):
        out += [os.path.relpath(os.path.join(root, f), d) for f in files]
    return sorted(out)


def manifest(d: Path, names: list[str] | None = None) -> dict[str, int]:
    """Sizes of the files ``names`` of ``d`` (default: all but the manifest itself)."""
    names = [n for n in file_names(d) if n != COMPLETE] if names is None else names
    return {n: (d / n).stat().st_size for n in names}


def per_rank(name: str) -> bool:
    """Whether checkpoint file ``name`` is one rank's own (DeepSpeed's ``pp_rank_{r}_``
    shards, our ``dide_rank{r:05d}``) rather than one file every rank reads."""
    base = Path(name).name
    return "pp_rank_" in base or base.startswith("dide_rank")


def written_by(name: str, r: int) -> bool:
    """Whether rank ``r`` wrote checkpoint file ``name`` (the shared files are rank 0's)."""
    base = Path(name).name
    if not per_rank(name):
        return r == 0
    return f"pp_rank_{r}_" in base or base.startswith(f"dide_rank{r:05d}")


def own_files(d: Path) -> dict[str, int]:
    """Sizes of the files of checkpoint ``d`` that this rank wrote, from this rank's stat()."""
    return manifest(d, [n for n in file_names(d) if n != COMPLETE and written_by(n, rank())])


def read_through(path: Path, size: int | None = None) -> str | None:
    """None when ``path`` has ``size`` bytes (if given), reads to its end and unpickles (its
    tensors mapped, not read again), else what failed.  Our own files unpickle tensors only;
    DeepSpeed's are unpickled as DeepSpeed itself does."""
    try:
        if size is not None and path.stat().st_size != size:
            return f"file {path.name} has {path.stat().st_size} bytes, expected {size} (truncated?)"
        with open(path, "rb") as f:
            while f.read(16 << 20):
                pass
        if path.suffix == ".pt":
            torch.load(path, map_location="cpu", mmap=True, weights_only=path.name.startswith("dide_rank"))
    except Exception as e:  # noqa: BLE001 - any failure to read is the verdict, reported by name
        return f"cannot read {path.name}: {type(e).__name__}: {e}"
    return None


def _gather_manifest(d: Path, group=None) -> dict[str, int]:
    """Every rank's own files, merged on every rank."""
    merged: dict[str, int] = {}
    for p in gather_objects(own_files(d), group):
        merged.update(p)
    return dict(sorted(merged.items()))


def complete_manifest(d: Path) -> tuple[dict[str, int] | None, str | None]:
    """(the files and sizes ``COMPLETE.json`` lists, None) or (None, why there is none)."""
    marker = d / COMPLETE
    try:
        return json.loads(marker.read_text())["files"], None
    except FileNotFoundError:
        return None, "incomplete (no COMPLETE.json: a save was interrupted)"
    except (OSError, ValueError, KeyError) as e:
        return None, f"corrupt or unreadable COMPLETE.json ({type(e).__name__})"


def verify(d: Path) -> str | None:
    """None if the checkpoint directory is complete and intact, else the reason."""
    want, problem = complete_manifest(d)
    if want is None:
        return problem
    for name, size in want.items():
        try:
            have = (d / name).stat().st_size
        except FileNotFoundError:
            return f"missing file {name}"
        except OSError as e:
            return f"cannot stat {name}: {type(e).__name__}: {e}"
        if have != size:
            return f"file {name} has {have} bytes, expected {size} (truncated?)"
    return None


class Stateful(Protocol):
    """A resumable part of a run: plain data and tensors out, the same back in."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpointer:
    """Save / resume / purge DeepSpeed sharded checkpoints of ``engine`` together with the
    run's resumable ``parts`` (name -> :class:`Stateful`).

    A part with ``per_rank = True`` (data position, RNG streams) belongs to one rank of one
    world size: when the world size changed since the save, its ``restart(step)`` is called
    instead of ``load_state_dict`` (new streams, never a replay).  The others (counters,
    best-model record, token queue) are identical on every rank and come from rank 0's file
    then.  A part the checkpoint lacks keeps its fresh state, with a warning.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, engine=None,
                 parts: dict[str, Stateful] | None = None, config: dict | None = None, group=None,
                 lost: Callable[[], str | None] | None = None):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.engine, self.parts, self.config, self.group = engine, dict(parts or {}), config, group
        self.lost = lost or (lambda: None)  # rank 0's word on whether the run directory is still ours
        self.pinned: set[str] = set()  # tags purge() must keep for now

    # -- save -----------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Checkpoint ``step`` (collective), unless a complete one exists already: rank 0's
        view decides, so every rank takes the same branch."""
        tag = tag_for(step)
        d = self.dir / tag
        done, lost = rank0_decides(((d / COMPLETE).exists(), self.lost()), self.group)
        if lost:
            raise LeaseLost(lost)
        if done:
            return d
        if rank() == 0 and d.exists():  # a stale partial save of the same step
            shutil.rmtree(d)
        barrier()
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state={"dide": {"step": step}},
                                    save_latest=False)
        own = {"state": {name: part.state_dict() for name, part in self.parts.items()
                         if rank() == 0 or getattr(part, "per_rank", False)},  # the same everywhere: once
               "config": self.config, "world_size": world_size()}
        tmp = d / f"dide_rank{rank():05d}.pt.tmp"
        torch.save(own, tmp)
        os.replace(tmp, d / f"dide_rank{rank():05d}.pt")
        barrier()  # every rank has written its shards and its state
        files = _gather_manifest(d, self.group)  # each file's size as its writer sees it
        if rank() == 0:
            atomic_write_text(d / COMPLETE, json.dumps({"step": step, "world_size": world_size(), "files": files}))
            atomic_write_text(self.dir / "latest", tag)
            self.purge()
        barrier()
        return d

    def purge(self) -> None:
        tags = self.complete_tags()
        for tag in tags[: max(0, len(tags) - self.keep_last)]:
            if tag in self.pinned:  # still being read (an export in the background)
                continue
            shutil.rmtree(self.dir / tag, ignore_errors=True)
            shutil.rmtree(self.dir / "universal" / tag, ignore_errors=True)

    # -- find -----------------------------------------------------------------------------
    def all_tags(self) -> list[str]:
        if not self.dir.exists():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step_"))

    def complete_tags(self) -> list[str]:
        return [t for t in self.all_tags() if (self.dir / t / COMPLETE).exists()]

    def candidates(self) -> list[str]:
        """Tags to try, newest first (the ``latest`` pointer is a hint, not the only truth:
        a crash between the marker and the pointer must not lose a complete checkpoint)."""
        return list(reversed(self.all_tags()))

    # -- resume ---------------------------------------------------------------------------
    def resume(self, load_optimizer: bool = True) -> int | None:
        """Load the newest checkpoint that every rank can read and load into the engine and
        the parts; returns its step, or None for a fresh start.  Broken checkpoints are
        reported and skipped.  The ranks agree on each candidate twice (CPU all-reduces on
        the control group): once every rank has read its files, before any rank calls
        DeepSpeed, and after the load.  So one rank that cannot read the newest (ESTALE,
        EIO, out of memory) sends all of them to the previous one, instead of resuming alone
        from another step or voting while the others wait in a collective of the load."""
        group = self.group
        for tag in self.candidates():
            d = self.dir / tag
            problem, own = self._readable(d)
            if all_ranks(problem is None, group):
                problem = self._load(self.engine, tag, load_optimizer, group)
                if all_ranks(problem is None, group):
                    step = json.loads((d / COMPLETE).read_text())["step"]
                    self._load_parts(own, step, d)
                    log.info("resumed from %s", d)
                    return step
                problem = problem or "another rank could not load it"
            else:
                problem = problem or "another rank could not read its files of it"
            log.warning("skipping checkpoint %s: %s", d, problem)
        return None

    def _readable(self, d: Path) -> tuple[str | None, dict | None]:
        """(None, this rank's saved state) when every file of ``d`` that this rank will read
        is listed in the manifest, has its size there and reads and unpickles; else (why,
        None).  On another world size rank 0 reads every file (it converts them) and the
        others none (they load the conversion)."""
        want, problem = complete_manifest(d)
        if want is None:
            return problem, None
        saved_world = self.saved_world(d)
        if saved_world == world_size():
            names = [n for n in want if written_by(n, rank()) or not per_rank(n)]
            mine = f"dide_rank{rank():05d}.pt"
            if mine not in want:
                return f"no state for rank {rank()} (saved at world size {saved_world})", None
        else:
            names = list(want) if rank() == 0 else []
        for name in names:
            problem = read_through(d / name, want[name])
            if problem is not None:
                return problem, None
        own = None
        if saved_world == world_size() or rank() == 0:
            own = torch.load(d / f"dide_rank{rank():05d}.pt", map_location="cpu", weights_only=True)
        return None, own

    def _load_parts(self, own: dict | None, step: int, d: Path) -> None:
        """The parts from the states read: per-rank parts from this rank's own file (restarted
        after a world-size change), the others from rank 0's, which rank 0 sends."""
        moved = self.saved_world(d) != world_size()
        shared_names = [n for n, part in self.parts.items() if not getattr(part, "per_rank", False)]
        shared = rank0_decides({n: own["state"][n] for n in shared_names if n in own["state"]}
                               if rank() == 0 else None, self.group)
        saved = {**(own["state"] if own is not None and not moved else {}), **shared}
        for name, part in self.parts.items():
            if moved and getattr(part, "per_rank", False):
                part.restart(step)
            elif name in saved:
                part.load_state_dict(saved[name])
            else:
                log.warning("the checkpoint has no state for %r: it starts fresh", name)

    def _load(self, engine, tag: str, load_optimizer: bool, group=None) -> str | None:
        from .engine import load_universal
        saved_world = self.saved_world(self.dir / tag)
        try:
            if saved_world != world_size():
                # another world size: DeepSpeed's universal format re-partitions the state
                log.warning("checkpoint %s was written by %d ranks, resuming on %d: converting to DeepSpeed's "
                            "universal format", tag, saved_world, world_size())
                error = self._universal(tag)
                if not all_ranks(error is None, group):
                    return error or "the universal conversion failed on rank 0"
                error = self._universal_readable(tag)
                if not all_ranks(error is None, group):  # before DeepSpeed's load, as for the native format
                    return error or "another rank could not read the universal conversion"
                path, _ = load_universal(engine, self.dir / "universal", tag, load_optimizer)
            else:
                path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=load_optimizer,
                                                 load_lr_scheduler_states=load_optimizer)
        except Exception as e:  # a corrupt shard surfaces as an unpickling/IO error
            return f"load failed: {e.__class__.__name__}: {e}"
        return None if path is not None else "DeepSpeed found nothing to load"

    def _universal_readable(self, tag: str) -> str | None:
        """None when every file of ``tag``'s universal conversion reads and unpickles here."""
        out = self.dir / "universal" / tag
        for name in file_names(out):
            problem = read_through(out / name)
            if problem is not None:
                return f"universal conversion: {problem}"
        return None

    def _universal(self, tag: str, poll_s: float = 1.0, timeout_s: float = 4 * 3600) -> str | None:
        """Rank 0 converts ``tag`` to the universal format; the others wait on the filesystem,
        not in a collective, so a conversion longer than ``train.collective_timeout_s`` (large
        models) cannot time them out.  Any failure of rank 0's leaves a FAILED marker that
        ends their wait.  Returns None when the conversion is there."""
        from . import engine as eng_mod
        out = self.dir / "universal" / tag
        failed = out.with_name(tag + ".FAILED")
        if rank() == 0:
            failed.unlink(missing_ok=True)
        barrier(self.group)  # nobody reads a FAILED marker left by an earlier attempt
        if rank() == 0:
            try:
                eng_mod.convert_to_universal(self.dir, tag, self.dir / "universal")
            except Exception as e:  # noqa: BLE001 - an OSError as much as a failed conversion
                error = f"{type(e).__name__}: {e}"
                try:
                    failed.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(failed, error)
                except OSError as e2:  # the others then wait out timeout_s: say why in rank 0's log
                    log.error("could not write %s (%s): the other ranks wait until their timeout", failed, e2)
                return error
            return None
        deadline = time.monotonic() + timeout_s
        while not (out / "CONVERTED").exists():
            if failed.exists():
                return failed.read_text()
            if time.monotonic() > deadline:
                return f"rank 0 did not finish the universal conversion of {tag} within {timeout_s:.0f} s"
            time.sleep(poll_s)
        return None

    @staticmethod
    def saved_world(d: Path) -> int:
        try:
            return json.loads((d / COMPLETE).read_text())["world_size"]
        except (OSError, ValueError, KeyError):
            return -1
