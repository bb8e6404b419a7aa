"""Checkpoints: the one module that saves, finds, validates, resumes and purges them.

Layout of a run directory::

    checkpoints/
      step_00000100/            DeepSpeed sharded checkpoint of the student (all ranks)
        ...                     (DeepSpeed's own files)
        dide_rank00000.pt       this project's per-rank state (weights_only-loadable)
        COMPLETE.json           written last, by rank 0, after every rank finished: a
                                manifest of every file and its size, each file's size
                                reported by the rank that wrote it (another node's stat()
                                of a file just written can be stale on NFS)
      latest                    tag of the newest complete checkpoint (atomic rename)

A checkpoint without ``COMPLETE.json``, or whose files do not match its manifest, is
reported and skipped in favour of the previous one; the ranks agree on the one they resume
from (a checkpoint that any rank fails to verify or load is skipped by all).  The teacher is
never saved.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Protocol

import torch

from .distributed import all_ranks, barrier, gather_objects, rank, rank0_decides, world_size
from .fsutil import atomic_write_text

log = logging.getLogger("dide_scale.checkpoint")
COMPLETE = "COMPLETE.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def manifest(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != COMPLETE}


def written_by(name: str, r: int) -> bool:
    """Whether rank ``r`` wrote checkpoint file ``name``: DeepSpeed's per-rank shards carry
    ``pp_rank_{r}_``, our state ``dide_rank{r:05d}``; everything else is rank 0's."""
    base = Path(name).name
    per_rank = "pp_rank_" in base or base.startswith("dide_rank")
    if not per_rank:
        return r == 0
    return f"pp_rank_{r}_" in base or base.startswith(f"dide_rank{r:05d}")


def own_files(d: Path) -> dict[str, int]:
    """Sizes of the files of checkpoint ``d`` that this rank wrote, from this rank's stat()."""
    return {k: v for k, v in manifest(d).items() if written_by(k, rank())}


def _gather_manifest(d: Path) -> dict[str, int]:
    """Every rank's own files, merged on every rank."""
    merged: dict[str, int] = {}
    for p in gather_objects(own_files(d)):
        merged.update(p)
    return dict(sorted(merged.items()))


def verify(d: Path) -> str | None:
    """None if the checkpoint directory is complete and intact, else the reason."""
    marker = d / COMPLETE
    if not marker.exists():
        return "incomplete (no COMPLETE.json: a save was interrupted)"
    try:
        want = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return "corrupt COMPLETE.json"
    have = manifest(d)
    for name, size in want.items():
        if name not in have:
            return f"missing file {name}"
        if have[name] != size:
            return f"file {name} has {have[name]} bytes, expected {size} (truncated?)"
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
                 parts: dict[str, Stateful] | None = None, config: dict | None = None, group=None):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.engine, self.parts, self.config, self.group = engine, dict(parts or {}), config, group

    # -- save -----------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Checkpoint ``step`` (collective), unless a complete one exists already: rank 0's
        view decides, so every rank takes the same branch."""
        tag = tag_for(step)
        d = self.dir / tag
        if rank0_decides((d / COMPLETE).exists(), self.group):
            return d
        if rank() == 0 and d.exists():  # a stale partial save of the same step
            shutil.rmtree(d)
        barrier()
        self.engine.save_checkpoint(str(self.dir), tag=tag, client_state={"dide": {"step": step}},
                                    save_latest=False)
        own = {"state": {name: part.state_dict() for name, part in self.parts.items()},
               "config": self.config, "world_size": world_size()}
        tmp = d / f"dide_rank{rank():05d}.pt.tmp"
        torch.save(own, tmp)
        os.replace(tmp, d / f"dide_rank{rank():05d}.pt")
        barrier()  # every rank has written its shards and its state
        files = _gather_manifest(d)  # each file's size as its writer sees it
        if rank() == 0:
            atomic_write_text(d / COMPLETE, json.dumps({"step": step, "world_size": world_size(), "files": files}))
            atomic_write_text(self.dir / "latest", tag)
            self.purge()
        barrier()
        return d

    def purge(self) -> None:
        tags = self.complete_tags()
        for tag in tags[: max(0, len(tags) - self.keep_last)]:
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
        """Load the newest checkpoint that every rank can verify and load into the engine and
        the parts; returns its step, or None for a fresh start.  Broken checkpoints are
        reported and skipped.  The ranks agree on each candidate (a CPU all-reduce on the
        control group), so one rank that cannot read the newest (ESTALE, out of memory) sends
        all of them to the previous one instead of resuming alone from another step."""
        group = self.group
        for tag in self.candidates():
            d = self.dir / tag
            problem = verify(d)
            if not all_ranks(problem is None, group):
                problem = problem or "another rank could not verify it"
            else:
                problem = self._load(self.engine, tag, load_optimizer, group)
                own = self._own_state(d) if problem is None else None
                if problem is None and own is None:
                    problem = f"no state for rank {rank()} (saved at world size {self.saved_world(d)})"
                if all_ranks(problem is None, group):
                    step = json.loads((d / COMPLETE).read_text())["step"]
                    self._load_parts(own, step)
                    log.info("resumed from %s", d)
                    return step
                problem = problem or "another rank could not load it"
            log.warning("skipping checkpoint %s: %s", d, problem)
        return None

    def _load_parts(self, own: dict, step: int) -> None:
        saved, moved = own["state"], own.get("world_changed", False)
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
                path, _ = load_universal(engine, self.dir / "universal", tag, load_optimizer)
            else:
                path, _ = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=load_optimizer,
                                                 load_lr_scheduler_states=load_optimizer)
        except Exception as e:  # a corrupt shard surfaces as an unpickling/IO error
            return f"load failed: {e.__class__.__name__}: {e}"
        return None if path is not None else "DeepSpeed found nothing to load"

    def _universal(self, tag: str, poll_s: float = 1.0, timeout_s: float = 4 * 3600) -> str | None:
        """Rank 0 converts ``tag`` to the universal format; the others wait on the filesystem,
        not in a collective, so a conversion longer than ``train.collective_timeout_s`` (large
        models) cannot time them out.  Returns None when the conversion is there."""
        from .engine import convert_to_universal
        out = self.dir / "universal" / tag
        failed = out.with_name(tag + ".FAILED")
        if rank() == 0:
            failed.unlink(missing_ok=True)
        barrier()  # nobody reads a FAILED marker left by an earlier attempt
        if rank() == 0:
            try:
                convert_to_universal(self.dir, tag, self.dir / "universal")
            except RuntimeError as e:
                atomic_write_text(failed, str(e))
                return str(e)
            return None
        deadline = time.monotonic() + timeout_s
        while not (out / "CONVERTED").exists():
            if failed.exists():
                return failed.read_text()
            if time.monotonic() > deadline:
                return f"rank 0 did not finish the universal conversion of {tag} within {timeout_s:.0f} s"
            time.sleep(poll_s)
        return None

    def _own_state(self, d: Path) -> dict | None:
        """This rank's saved state; after a world-size change, rank 0's, marked so that the
        per-rank parts restart instead of loading it."""
        p = d / f"dide_rank{rank():05d}.pt"
        if self.saved_world(d) == world_size() and p.exists():
            return torch.load(p, map_location="cpu", weights_only=True)
        p0 = d / "dide_rank00000.pt"
        if not p0.exists():
            return None
        own = torch.load(p0, map_location="cpu", weights_only=True)
        own["world_changed"] = True
        return own

    @staticmethod
    def saved_world(d: Path) -> int:
        try:
            return json.loads((d / COMPLETE).read_text())["world_size"]
        except (OSError, ValueError, KeyError):
            return -1
