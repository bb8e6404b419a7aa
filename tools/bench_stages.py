#!/usr/bin/env python
"""DiDE's second claim on the demo task: distillation in pre-training *and* fine-tuning beats
distillation in fine-tuning alone.

On the demo's scenes (their shards carry captions for ITM and questions for VQA), once:

  teacher_itm    a fusion teacher pre-trained on image-text matching (ground truth)
  teacher_vqa    that teacher fine-tuned on the VQA questions (ground truth)

(the teachers are trained once, with seed 0, and shared by every seed: the seeds measure the
students' spread, and two teachers per seed would triple the run time on 2 cores), then per
seed:

  pre_gt         a dual encoder pre-trained on ITM + ITC from ground truth
  pre_kd         the same pre-training distilled from teacher_itm (attention, soft ITM labels)
  pre_attn       pre_kd without the soft ITM labels (attention KL + ground truth + ITC): the
                 soft labels of a teacher that is itself imperfect on ITM slow the student's
                 own ITM fit (BENCHMARKS.md section 1b), the attention maps carry the
                 cross-modal alignment the method is about

then five dual-encoder students, every one pre-trained for --pretrain-steps and fine-tuned
for --finetune-steps (the same total), each chained as a user would (``dide-pretrain``,
then ``dide-finetune`` with ``student.init=export:...``):

  none           pre_gt, fine-tuned on ground truth            (no distillation anywhere)
  ft_kd          pre_gt, fine-tuned distilling teacher_vqa      (distillation in fine-tuning only)
  both_kd        pre_kd, fine-tuned distilling teacher_vqa      (in pre-training and fine-tuning)
  pre_kd_ft_gt   pre_kd, fine-tuned on ground truth            (in pre-training only)
  attn_kd        pre_attn, fine-tuned distilling teacher_vqa   (attention only in pre-training)

Fine-tuning distillation is the paper's: attention KL (t2i + i2t) + soft labels, ground
truth weight 0.  Reported: held-out accuracy per question type (mean ± std over seeds), the
fraction of the teacher's gap over ``none`` each student closes, and a plot of held-out
accuracy against fine-tuning step (seed spread shaded).

    OMP_NUM_THREADS=1 python tools/bench_stages.py --out runs/stages_long --seeds 0,1,2 \
        --students none,ft_kd,both_kd --md docs/bench_stages_long.md --plot docs/stages_long.png

(seeds can also run side by side, one process per ``--seeds N`` on the same ``--out``; a
last invocation with every seed only reads the runs back and draws the table and plot).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from dide_scale.demo import (
    DISTIL,
    NO_DISTIL,
    PAPER_FINETUNE,
    curve,
    make_data,
    shard_overrides,
    train_run,
    train_teachers,
)

STUDENTS = {
    "none": ("no distillation", "pre_gt", False),
    "ft_kd": ("distillation in fine-tuning only", "pre_gt", True),
    "both_kd": ("distillation in pre-training and fine-tuning", "pre_kd", True),
    "pre_kd_ft_gt": ("distillation in pre-training only", "pre_kd", False),
    "attn_kd": ("attention-only distillation in pre-training, then in fine-tuning", "pre_attn", True),
}


def run(name: str, out: Path, overrides: list[str], steps: int, seed: int, args) -> Path:
    """One training run on ``args.config``, the user's overrides last (skipped when its export
    exists: an interrupted benchmark resumes)."""
    return train_run(name, out / name, overrides, steps, seed, args.config, args.overrides)


def run_seed(out: Path, data: Path, seed: int, teachers: tuple[Path, Path], args) -> dict:
    t_itm, t_vqa = teachers
    itm = [*shard_overrides(data, "itm"), "loss.ground_truth=1.0", "loss.itc=1.0"]
    kd_itm = [*itm, *DISTIL, f"teacher.path={t_itm}"]
    pre_runs = {"pre_gt": [*itm, *NO_DISTIL], "pre_kd": kd_itm, "pre_attn": [*kd_itm, "loss.soft_label=0"]}
    needed = {STUDENTS[k][1] for k in args.student_list}
    pre = {name: run(name, out, ov, args.pretrain_steps, seed, args) for name, ov in pre_runs.items() if name in needed}
    res = {"teacher": curve(t_vqa.parent)}
    for key in args.student_list:
        _, start, kd = STUDENTS[key]
        loss = [*PAPER_FINETUNE, f"teacher.path={t_vqa}"] if kd else [*NO_DISTIL, "loss.ground_truth=1.0"]
        d = run(key, out, [*shard_overrides(data, "vqa"), *loss, f"student.init=export:{pre[start] / 'export'}"],
                args.finetune_steps, seed, args)
        res[key] = curve(d)
    return res


def final(res: dict, key: str, qtype: str = "accuracy") -> float:
    name = "accuracy" if qtype == "accuracy" else f"acc_{qtype}"
    return res[key][name][-1][1]


def table(results: list[dict], args) -> str:
    def ms(vals):
        vals = [100 * v for v in vals]
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"
    qtypes = sorted(k[4:] for k in results[0]["teacher"] if k.startswith("acc_"))
    rows = [("teacher", f"fusion teacher (ITM {args.teacher_itm_steps} + VQA {args.teacher_vqa_steps} steps, "
                         "seed 0, shared)")] + \
        [(k, STUDENTS[k][0]) for k in students_in(results)]
    lines = [f"Held-out accuracy, % (mean ± std over {len(results)} seed(s)); students: {args.pretrain_steps} "
             f"pre-training + {args.finetune_steps} fine-tuning steps each", "",
             "| model | all | " + " | ".join(qtypes) + " | teacher gap closed |",
             "|---|---|" + "---|" * len(qtypes) + "---|"]
    for key, label in rows:
        cells = [ms([final(r, key) for r in results])] + [ms([final(r, key, q) for r in results]) for q in qtypes]
        if key in ("teacher", "none"):
            gap = "-"
        else:
            closed = [(final(r, key) - final(r, "none")) / max(1e-9, final(r, "teacher") - final(r, "none"))
                      for r in results]
            gap = f"{100 * statistics.mean(closed):.0f}% ({', '.join(f'{100 * c:.0f}' for c in closed)})"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {gap} |")
    lines += ["", "Per seed (overall %): " + "; ".join(
        f"seed {s}: " + ", ".join(f"{k} {100 * final(r, k):.1f}" for k, _ in rows)
        for s, r in zip(args.seed_list, results))]
    return "\n".join(lines)


def students_in(results: list[dict]) -> list[str]:
    """The students a run measured, in STUDENTS order."""
    return [k for k in STUDENTS if k in results[0]]


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(100 * final(results[0], "teacher"), color="k", ls="--", lw=1, label="fusion teacher (final)")
    for key, label in [(k, STUDENTS[k][0]) for k in students_in(results)]:
        steps = [s for s, _ in results[0][key]["accuracy"]]
        vals = np.array([[v for _, v in r[key]["accuracy"]] for r in results]) * 100
        mean = vals.mean(0)
        line, = ax.plot(steps, mean, marker="o", ms=3, label=label)
        if len(results) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out VQA accuracy, %")
    ax.set_title(f"Demo task, {len(results)} seed(s): mean, shaded min-max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/stages")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--train-samples", type=int, default=20_000)
    ap.add_argument("--val-samples", type=int, default=2_000)
    ap.add_argument("--teacher-itm-steps", type=int, default=1500)
    ap.add_argument("--teacher-vqa-steps", type=int, default=3000)
    ap.add_argument("--pretrain-steps", type=int, default=2400,
                    help="per student (default 2400: twice the fine-tuning, the regime where two-stage "
                         "distillation led on every seed; BENCHMARKS.md section 1b)")
    ap.add_argument("--finetune-steps", type=int, default=1200)
    ap.add_argument("--students", default=",".join(STUDENTS),
                    help=f"comma-separated subset of {','.join(STUDENTS)} (default: all; 'none' is always run: "
                         "the gap is measured from it)")
    ap.add_argument("--md", default=None, help="also write the table here")
    ap.add_argument("--plot", default=None, help="write the learning-curve plot (PNG) here")
    ap.add_argument("--teachers-only", action="store_true",
                    help="train (or read back) the two teachers, print their held-out accuracy and stop")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (e.g. optim.lr=3e-3)")
    args = ap.parse_args(argv)
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    chosen = {"none", *args.students.split(",")}
    if chosen - set(STUDENTS):
        ap.error(f"unknown student(s) {sorted(chosen - set(STUDENTS))}; choose from {list(STUDENTS)}")
    args.student_list = [k for k in STUDENTS if k in chosen]
    import torch

    from dide_scale.metrics import setup_logging
    setup_logging(0)
    out = Path(args.out)
    t0 = time.time()
    make_data(out / "data", args.train_samples, args.val_samples)
    teachers = train_teachers(out / "teachers", out / "data", args.teacher_itm_steps, args.teacher_vqa_steps,
                              args.config, args.overrides)
    if args.teachers_only:
        acc = curve(teachers[1].parent)
        print(f"teacher_vqa held-out accuracy: {100 * acc['accuracy'][-1][1]:.2f}% (" + ", ".join(
            f"{k[4:]} {100 * v[-1][1]:.1f}" for k, v in sorted(acc.items()) if k.startswith("acc_")) + ")")
        return 0
    results = []
    for seed in args.seed_list:
        results.append(run_seed(out / f"seed{seed}", out / "data", seed, teachers, args))
        (out / "results.json").write_text(json.dumps(results, indent=1))
    md = table(results, args)
    md += (f"\n\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
           f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}; "
           f"this invocation {time.time() - t0:.0f} s (runs whose export already existed were reused, not re-timed).")
    print(md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
