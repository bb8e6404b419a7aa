"""Where the demo's DiDE student stops short of its teacher: one term of the fine-tuning preset
changed at a time, on the demo's data, one seed.

    OMP_NUM_THREADS=1 python tools/demo_ablation.py --out runs/ablation --seed 0 --md docs/demo_ablation.md

Every run is ``dide_scale.demo.train_run`` (the Trainer, the DeepSpeed engine, the
webdataset reader) with the demo config, the shipped VQA teacher and the student of
``dide-demo`` (same shapes, batch, learning rate, steps); only the named overrides differ.
Runs whose export exists are reused, so the command resumes and can be split over
processes (``--variants``).  Prints the held-out accuracy per question type, the share of
the teacher's lead over the no-distillation student of the same length that each run
closes, and the counting accuracy at every evaluation.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dide_scale.demo import (
    NO_DISTIL,
    PAPER_FINETUNE,
    curve,
    evaluate_export,
    make_data,
    shard_overrides,
    shipped_teachers,
    train_run,
)
from dide_scale.metrics import setup_logging

VARIANTS = {  # name -> (what changes, overrides after the student's data, steps multiplier)
    "no_distill": ("no distillation (ground truth only)", [*NO_DISTIL, "loss.ground_truth=1.0"], 1),
    "dide": ("DiDE preset: attention t2i + i2t (last block), soft labels T=1, ground truth 0", PAPER_FINETUNE, 1),
    "soft_only": ("soft labels only (no attention)", ["loss.attn_t2i=0", "loss.attn_i2t=0", "loss.soft_label=1.0",
                                                      "loss.ground_truth=0.0"], 1),
    "attn_gt": ("attention + ground truth (no soft labels)", ["loss.attn_t2i=1.0", "loss.attn_i2t=1.0",
                                                              "loss.soft_label=0", "loss.ground_truth=1.0"], 1),
    "gt1": ("preset + ground truth weight 1", [*PAPER_FINETUNE, "loss.ground_truth=1.0"], 1),
    "t4": ("preset, soft-label temperature 4", [*PAPER_FINETUNE, "loss.temperature=4.0"], 1),
    "block2": ("preset, attention of the middle block (2 of 3)", [*PAPER_FINETUNE, "loss.teacher_layer=-2",
                                                                  "loss.student_layer=-2"], 1),
    "block1": ("preset, attention of the first block", [*PAPER_FINETUNE, "loss.teacher_layer=0",
                                                        "loss.student_layer=0"], 1),
    "steps2x": ("preset, twice the steps", PAPER_FINETUNE, 2),
    "no_distill_2x": ("no distillation, twice the steps", [*NO_DISTIL, "loss.ground_truth=1.0"], 2),
}
TYPES = ("color", "count", "exist", "shape")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1200, help="student steps (dide-demo's default)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--train-samples", type=int, default=20_000)
    ap.add_argument("--val-samples", type=int, default=2_000)
    ap.add_argument("--md", default=None, help="also write the table here")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    setup_logging(0)
    if set(names) - set(VARIANTS):
        ap.error(f"--variants: of {list(VARIANTS)}")
    out, data = Path(args.out), Path(args.out) / "data"
    make_data(data, args.train_samples, args.val_samples)
    _, t_vqa = shipped_teachers()
    teacher = evaluate_export(t_vqa, data)
    res = {}
    for name in names:
        _, overrides, mult = VARIANTS[name]
        run_dir = train_run(name, out / f"seed{args.seed}" / name,
                            [*shard_overrides(data, "vqa"), *overrides, "student.init=random", f"teacher.path={t_vqa}"],
                            args.steps * mult, args.seed)
        res[name] = {"eval": json.loads((run_dir / "summary.json").read_text())["eval"], "curve": curve(run_dir)}
    def baseline(mult: int) -> float | None:  # the no-distillation run of the same length
        key = "no_distill" if mult == 1 else "no_distill_2x"
        return res.get(key, {}).get("eval", {}).get("accuracy")
    rows = [["fusion teacher (shipped)", "-", f"{100 * teacher['accuracy']:.1f}",
             *(f"{100 * teacher['per_type'][t]:.1f}" for t in TYPES), "-", "-"]]
    for name in names:
        ev, cv = res[name]["eval"], res[name]["curve"]
        base = baseline(VARIANTS[name][2])
        gap = (f"{100 * (ev['accuracy'] - base) / (teacher['accuracy'] - base):.0f}%"
               if base is not None and not name.startswith("no_distill") else "-")
        count_curve = " ".join(f"{100 * v:.0f}" for _, v in cv.get("acc_count", []))
        rows.append([VARIANTS[name][0], str(args.steps * VARIANTS[name][2]), f"{100 * ev['accuracy']:.1f}",
                     *(f"{100 * ev['per_type'][t]:.1f}" for t in TYPES), gap, count_curve])
    head = ["run", "steps", "all", *TYPES, "teacher gap closed", "count at each evaluation"]
    md = "\n".join([f"Held-out accuracy, %, seed {args.seed}, {args.val_samples} questions", "",
                    "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                    *("| " + " | ".join(r) + " |" for r in rows)])
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
