"""Re-using a run directory: what may change between two runs on one ``train.output_dir``.

Re-running on a directory resumes from its newest intact checkpoint.  That is only sound
for the same model: a checkpoint of another shape or task cannot be loaded, and a run
that went on regardless would train from scratch, overwrite ``config.yaml`` and then
export or select against checkpoints, ``export/`` and ``best/`` of another model.  So a
changed model shape or task is refused before anything is written, naming the keys; the
ways out are a new directory, or ``--start-over``, which moves the old run aside into
``RUN/superseded/<time>/`` (nothing is deleted).  Any other change (learning rate, steps,
data) resumes, and the run says which settings changed.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import yaml

# The keys that decide the student's parameters (and what its head means): a checkpoint
# written under other values cannot be resumed.
SHAPE_KEYS = ("train.task", "student.kind", "student.arch.width", "student.arch.depth", "student.arch.heads",
              "student.arch.mlp_ratio", "student.arch.patch_size", "student.arch.image_size",
              "student.arch.max_text_len", "student.arch.vocab_size")
# What a run leaves in its directory, moved aside together by --start-over (lease.json
# belongs to the job holding the directory, submitit/ to the job being submitted).
RUN_ENTRIES = ("checkpoints", "export", "best", "tb", "logs", "config.yaml", "ds_config.json", "summary.json",
               "export.tmp", "best.tmp")
SUPERSEDED = "superseded"


class RunDirMismatch(ValueError):
    """The run directory holds checkpoints of another model shape or task."""


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def holds_results(run_dir: Path) -> bool:
    """Whether the directory holds what a run leaves behind: checkpoints or an export."""
    ck = run_dir / "checkpoints"
    has_ckpt = ck.is_dir() and any(p.name.startswith("step_") for p in ck.iterdir())
    return has_ckpt or (run_dir / "export" / "config.json").exists() or (run_dir / "best" / "config.json").exists()


def recorded_config(run_dir: Path) -> dict | None:
    """The flattened config the directory's results were written with (``config.yaml``),
    or None when it holds no results."""
    if not holds_results(run_dir):
        return None
    f = run_dir / "config.yaml"
    if not f.is_file():
        return None
    data = yaml.safe_load(f.read_text())
    return flatten(data) if isinstance(data, dict) else None


def _identity(flat: dict) -> dict[str, Any]:
    """What must stay equal for a checkpoint to load into the model ``flat`` describes."""
    out = {k: flat[k] for k in SHAPE_KEYS if k in flat}
    if flat.get("train.task") == "vqa" and "data.num_answers" in flat:
        out["data.num_answers"] = flat["data.num_answers"]  # the answer head's size
    if flat.get("student.kind") == "fusion" and "loss.token_nce" in flat:
        nce = (flat["loss.token_nce"] or 0) > 0  # adds DistillVLM's projections to the student
        out["loss.token_nce"] = nce
        if nce and "loss.layer_map" in flat:
            out["loss.layer_map"] = flat["loss.layer_map"]
    return out


def differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(model shape / task changes, other changes) between two flattened configs, each as
    ``key old -> new``; keys the older record lacks are not compared."""
    def show(key: str) -> str:
        return f"{key} {old.get(key)!r} -> {new.get(key)!r}"
    was, now = _identity(old), _identity(new)
    shape = [show(k) for k in now if k in was and was[k] != now[k]]
    shape_keys = {s.split(" ", 1)[0] for s in shape}
    other = [show(k) for k in new if k in old and old[k] != new[k] and k not in shape_keys
             and k != "train.output_dir"]
    return shape, other


def reuse_problem(cfg, how_to_start_over: str = "pass --start-over") -> str | None:
    """None when ``cfg`` may run on its ``train.output_dir`` (new, empty, or holding results
    of the same model shape and task), else the one-line refusal."""
    run_dir = Path(cfg.train.output_dir)
    old = recorded_config(run_dir)
    if old is None:
        return None
    shape, _ = differences(old, flatten(cfg.to_dict()))
    if not shape:
        return None
    return (f"train.output_dir={run_dir} holds a run of another model ({'; '.join(shape)}), which cannot be "
            f"resumed: choose a new train.output_dir, or {how_to_start_over} to move the old run aside into "
            f"{run_dir / SUPERSEDED}/ and start from step 0")


def changed_settings(cfg) -> list[str]:
    """The settings other than the model's that differ from the directory's results
    (a resume goes on with the new ones)."""
    old = recorded_config(Path(cfg.train.output_dir))
    return [] if old is None else differences(old, flatten(cfg.to_dict()))[1]


def move_aside(run_dir: str | os.PathLike) -> Path | None:
    """Move what earlier runs left in ``run_dir`` into ``run_dir/superseded/<time>/``;
    returns that folder (None when there was nothing to move).  Call it holding the
    directory's lease."""
    run_dir = Path(run_dir)
    present = [name for name in RUN_ENTRIES if (run_dir / name).exists()]
    if not present:
        return None
    dest = run_dir / SUPERSEDED / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    dest.mkdir(parents=True)
    for name in present:
        os.replace(run_dir / name, dest / name)
    return dest
