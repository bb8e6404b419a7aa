#!/usr/bin/env python
"""Train the demo's fusion teachers and ship them inside the package (``dide_scale/demo_teachers``).

    python tools/make_demo_teachers.py [--out runs/demo_teachers] [--ship dide_scale/demo_teachers]

The recipe is ``dide_scale.demo.train_teachers``: on the demo's scenes (20,000 training
samples, seed 0), a fusion teacher (the demo config: 64 wide, 3 blocks, 4 heads) pre-trained
on image-text matching for 1,500 steps, then fine-tuned on the VQA questions for 3,000 steps
from that export (ground truth only, through the same Trainer, DeepSpeed engine and
webdataset reader as every run).  Both exports are evaluated on the demo's held-out split
(VQA accuracy per question type; ITM pair accuracy) and copied to ``--ship`` with a model
card that records the command, seed, commit, recipe, held-out figures and a digest of the
held-out split's texts (``tests/test_demo_teachers.py`` checks the figures against it).

Training is deterministic for a given code, software and torch thread count (2 threads on a
2-core machine: about 12 minutes); runs whose export exists are reused.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from dide_scale import demo
from dide_scale.metrics import setup_logging

ROOT = Path(__file__).resolve().parent.parent


def commit() -> str:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return sha + (" (with uncommitted changes)" if dirty else "")


CARD = """---
{front}---

# dide_scale demo teacher: {title}

A fusion-encoder vision-language model (ViLT-style: one transformer over text tokens and image
patches, 3 blocks x 64 wide, 4 heads, patch 8) trained by dide_scale on the procedural demo
scenes (`dide-data demo`), shipped so that `dide-demo` starts from a pre-trained teacher as users
of DiDE start from ViLT's released checkpoints.

| | |
|---|---|
| role | {role} |
| recipe | {recipe} |
| made by | `{command}` |
| seed | {seed} |
| commit | `{commit}` |
| held-out | {held_out} |
| machine | {machine} |

Use it as `teacher.path` (distillation) or `student.init=export:DIR`; `dide-demo` does.
"""


def held_out_text(res: dict) -> str:
    per = ", ".join(f"{k} {100 * v:.2f}%" for k, v in res["per_type"].items())
    return f"{100 * res['accuracy']:.2f}% of {res['n']} ({per})"


def ship(export: Path, dest: Path, role: str, recipe: str, res: dict, digest: str, task: str) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(export, tmp)
    meta = {"role": role, "recipe": recipe, "command": "python tools/make_demo_teachers.py", "seed": 0,
            "commit": commit(), "task": task,
            "held_out": {"split": "dide-demo's val split: 2,000 samples, seed 10000", "texts_sha256": digest,
                         "metric": "VQA accuracy" if task == "vqa" else "ITM pair accuracy "
                         "(each caption with its image, and with the next sample's image in a batch of 256)",
                         "accuracy": res["accuracy"], "n": res["n"], "per_type": res["per_type"]}}
    front = yaml.safe_dump({"library_name": "dide_scale", "tags": ["vision-language", "dide-demo"],
                            "dide_demo": meta}, sort_keys=False)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    (tmp / "README.md").write_text(CARD.format(
        front=front, title=role, role=role, recipe=recipe, command=meta["command"], seed=0, commit=meta["commit"],
        held_out=held_out_text(res), machine=machine))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo_teachers", help="run directory of the teachers' training")
    ap.add_argument("--ship", default=str(demo.SHIPPED_TEACHERS), help="where the exports go (the package)")
    args = ap.parse_args(argv)
    setup_logging(0)
    out, dest = Path(args.out), Path(args.ship)
    t0 = time.time()
    demo.make_data(out / "data", 20_000, 2_000)
    itm, vqa = demo.train_teachers(out, out / "data")
    digest = demo.split_digest(out / "data" / "vqa" / "val")
    recipe_itm = (f"image-text matching for {demo.TEACHER_ITM_STEPS} steps from random initialisation (ground truth, "
                  "hard negatives), demo config: batch 64, AdamW 1e-3")
    recipe_vqa = (f"{recipe_itm}; then VQA for {demo.TEACHER_VQA_STEPS} steps from that export (ground truth)")
    for export, name, role, recipe, task in ((itm, "itm", "ITM-pre-trained teacher", recipe_itm, "itm"),
                                             (vqa, "vqa", "VQA teacher", recipe_vqa, "vqa")):
        res = demo.evaluate_export(export, out / "data", task)
        ship(export, dest / name, role, recipe, res, digest, task)
        print(f"{name}: held-out {held_out_text(res)} -> {dest / name}")
    print(f"{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
