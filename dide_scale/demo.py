"""``dide-demo``: the whole method end to end on data the project draws itself.

1. write the demo shards (scenes of coloured shapes + captions + questions) as webdataset tars;
2. take the fusion teachers: the ones shipped inside the package (an ITM-pre-trained teacher
   and the VQA teacher fine-tuned from it, as DiDE starts from ViLT's released checkpoints),
   or, with ``--train-teachers``, train them here with the same recipe;
3. train dual-encoder students for the same steps on the same data from random
   initialisation: one on ground truth only, one with DiDE distillation (cross-modal attention
   KL + soft labels, ground-truth weight 0); ``--two-stage`` adds a student pre-trained on ITM
   with distillation from the ITM teacher, then fine-tuned with distillation;
4. evaluate the teacher and the students on the held-out split (accuracy per question type)
   and draw their held-out accuracy against the step (``curves.png``);
5. measure student vs teacher inference throughput, with and without cached images;
6. write ``results.md`` / ``results.json`` to the run directory and print the table.

Every training run goes through ``dide_scale.train.run``: the DeepSpeed engine and the
webdataset reader of the cluster jobs, at world size 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from . import distributed
from .config import load_config
from .console import DefaultsHelpFormatter, add_version, quiet_libraries

log = logging.getLogger("dide_scale")

SHIPPED_TEACHERS = Path(__file__).parent / "demo_teachers"
"""The demo's fusion teachers, exported in the project's format (``itm/`` and ``vqa/``), made
by ``tools/make_demo_teachers.py``; each model card records the command, seed, commit and
held-out accuracy."""
TEACHER_ITM_STEPS, TEACHER_VQA_STEPS = 1500, 3000
"""The teacher recipe: ITM pre-training, then VQA fine-tuning from it (BENCHMARKS.md section 1:
a teacher trained on VQA from scratch stays on a plateau for some question type)."""
DISTIL = ["loss.attn_t2i=1.0", "loss.attn_i2t=1.0", "loss.soft_label=1.0"]
NO_DISTIL = ["loss.attn_t2i=0", "loss.attn_i2t=0", "loss.soft_label=0"]
PAPER_FINETUNE = [*DISTIL, "loss.ground_truth=0.0"]
"""DiDE's fine-tuning losses: attention KL (t2i + i2t) and soft labels, no ground truth."""


def last_shard(d: Path) -> str:
    """The name (without .tar) of the last shard in a demo split folder."""
    from .data.shards import read_sizes
    return sorted(read_sizes(d))[-1][:-4]


def shard_overrides(data: Path, task: str = "vqa") -> list[str]:
    """The demo's train and held-out shards for ``task`` ('vqa', or 'itm' on the same scenes'
    captions; ITM runs without a held-out evaluation)."""
    train, val = data / "vqa" / "train", data / "vqa" / "val"
    out = [f"data.train_shards={train}/{{00000..{last_shard(train)}}}.tar", f"train.task={task}"]
    out.append(f"data.val_shards={val}/{{00000..{last_shard(val)}}}.tar" if task == "vqa" else "data.val_shards=")
    return out


SPLIT_SEEDS = {"train": 0, "val": 10_000}


def make_split(data: Path, split: str, n: int) -> Path:
    """The demo's ``split`` ('train' or 'val') of ``n`` samples under ``data/vqa/`` (kept when
    it is there already)."""
    from .data.demo import generate_split
    from .data.shards import read_sizes
    d = data / "vqa" / split
    if sum(read_sizes(d).values()) != n:
        generate_split(d, n, SPLIT_SEEDS[split], "vqa", samples_per_shard=max(256, n // 10))
    return d


def make_data(data: Path, n_train: int, n_val: int) -> None:
    make_split(data, "train", n_train)
    make_split(data, "val", n_val)
    log.info("demo shards: %s", data)


def split_digest(split_dir: Path) -> str:
    """sha256 over the texts and labels (.txt and .json members, in shard and member order) of a
    demo split: what the generator drew, whatever the JPEG encoder's version."""
    import hashlib
    import tarfile
    h = hashlib.sha256()
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith((".txt", ".json")):
                    h.update(m.name.encode())
                    h.update(tf.extractfile(m).read())
    return h.hexdigest()


def train_one(name: str, overrides: list[str], config: str) -> dict:
    from .engine import build_ds_config
    from .train import run
    env = distributed.detect()
    cfg = load_config(config, overrides, world_size=env.world_size)
    t0 = time.time()
    log.info("=== %s: %d steps ===", name, cfg.train.max_steps)
    summary = run(cfg, env, build_ds_config(cfg, env.world_size))
    summary["train_seconds"] = time.time() - t0
    return summary


def train_run(name: str, run_dir: Path, overrides: list[str], steps: int, seed: int, config: str = "demo",
              extra: list[str] | tuple = ()) -> Path:
    """One training run (``extra``: the user's overrides, last), evaluated 8 times; skipped when
    its export exists, so an interrupted demo or benchmark resumes where it stopped."""
    if not (run_dir / "export" / "config.json").exists():
        summary = train_one(name, [*overrides, *extra, f"train.output_dir={run_dir}", f"train.max_steps={steps}",
                                   f"train.seed={seed}", f"train.eval_every={max(steps // 8, 1)}"], config)
        if summary["exit_code"]:
            raise RuntimeError(f"{name} did not finish (exit code {summary['exit_code']})")
    return run_dir


def train_teachers(out: Path, data: Path, itm_steps: int = TEACHER_ITM_STEPS, vqa_steps: int = TEACHER_VQA_STEPS,
                   config: str = "demo", extra: list[str] | tuple = ()) -> tuple[Path, Path]:
    """The demo's fusion teachers, seed 0: ITM pre-training on the scenes' captions (ground
    truth, hard negatives), then VQA fine-tuning from that export.  Returns the two exports."""
    fusion = ["student.kind=fusion", "loss.ground_truth=1.0", *NO_DISTIL]
    itm = train_run("teacher_itm", out / "teacher_itm", [*shard_overrides(data, "itm"), *fusion], itm_steps, 0,
                    config, extra)
    vqa = train_run("teacher_vqa", out / "teacher_vqa", [*shard_overrides(data, "vqa"), *fusion,
                                                         f"student.init=export:{itm / 'export'}"],
                    vqa_steps, 0, config, extra)
    return itm / "export", vqa / "export"


def shipped_teachers() -> tuple[Path, Path]:
    """The (ITM, VQA) teachers inside the package."""
    itm, vqa = SHIPPED_TEACHERS / "itm", SHIPPED_TEACHERS / "vqa"
    for d in (itm, vqa):
        if not (d / "model.safetensors").is_file():
            raise FileNotFoundError(f"{d}: the shipped demo teacher is missing (a broken install?); "
                                    "`dide-demo --train-teachers` trains the teachers instead")
    return itm, vqa


def evaluate_export(model_dir: Path, data: Path, task: str = "vqa", batch_size: int = 256) -> dict:
    """Held-out figures of an exported model on the demo's val split: VQA accuracy per question
    type, or ITM pair accuracy (``evaluate.itm_pair_accuracy``) for an ITM model."""
    from .data.pipeline import build_loader
    from .evaluate import evaluate, export_settings, itm_pair_accuracy
    from .models.saved import load_pretrained
    model = load_pretrained(model_dir)
    val = data / "vqa" / "val"
    cfg = load_config(None, ["data.num_workers=0", f"train.task={task}", "loss.ground_truth=1", *NO_DISTIL,
                             f"data.val_shards={val}/{{00000..{last_shard(val)}}}.tar"],
                      base=export_settings(str(model_dir), model))
    loader = build_loader(cfg, "val", batch_size=batch_size)
    if task == "itm":
        return itm_pair_accuracy(model, loader)
    res = evaluate(model, loader, task, torch.device("cpu"))
    res.pop("predictions", None)
    return res


def curve(run_dir: Path) -> dict:
    """Held-out accuracy per evaluation step (overall and per type), from TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(run_dir / "tb"))
    ea.Reload()
    tags = [t for t in ea.Tags()["scalars"] if t == "eval/accuracy" or t.startswith("eval/acc_")]
    return {t.split("/", 1)[1]: [(e.step, e.value) for e in ea.Scalars(t)] for t in tags}


def measure_throughput(student_dir: Path, teacher_dir: Path, data: Path, config: str, n: int = 256) -> dict:
    from .data.pipeline import build_loader
    from .inference import compare_vqa_throughput
    from .models.images import from_batch
    from .models.saved import load_pretrained
    cfg = load_config(config, [f"data.val_shards={data}/vqa/val/00000.tar", "data.num_workers=0"])
    batch = next(iter(build_loader(cfg, "val", batch_size=n)))
    teacher, student = load_pretrained(teacher_dir), load_pretrained(student_dir)
    return compare_vqa_throughput(student, teacher, from_batch(batch), batch["input_ids"], batch["attention_mask"],
                                  questions_per_image=4)


STUDENTS = {"no_distill": "dual encoder, no distillation", "dide": "dual encoder, DiDE",
            "two_stage": "dual encoder, DiDE in pre-training and fine-tuning"}


def run_seed(out: Path, data: Path, seed: int, teachers: tuple[Path, Path], args) -> dict:
    """The students of one seed; returns each one's final evaluation and curve."""
    t_itm, t_vqa = teachers
    d = out / f"seed{seed}"
    vqa = shard_overrides(data, "vqa")
    runs = {"no_distill": (vqa + [*NO_DISTIL, "loss.ground_truth=1.0"], "random"),
            "dide": (vqa + [*PAPER_FINETUNE, f"teacher.path={t_vqa}"], "random")}
    if args.two_stage:
        pre = train_run("two_stage pre-training", d / "two_stage_pre",
                        [*shard_overrides(data, "itm"), *DISTIL, "loss.ground_truth=1.0", "loss.itc=1.0",
                         f"teacher.path={t_itm}"], args.pretrain_steps, seed, args.config, args.overrides)
        runs["two_stage"] = (runs["dide"][0], f"export:{pre / 'export'}")
    res = {}
    for key, (overrides, init) in runs.items():
        run_dir = train_run(STUDENTS[key], d / key, [*overrides, f"student.init={init}"], args.student_steps, seed,
                            args.config, args.overrides)
        res[key] = {"eval": json.loads((run_dir / "summary.json").read_text())["eval"], "curve": curve(run_dir)}
    res["throughput"] = measure_throughput(d / "dide" / "export", t_vqa, data, args.config)
    return res


def _ms(vals: list[float]) -> str:
    vals = [v * 100 for v in vals]
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def gap_closed(student: float, baseline: float, teacher: float) -> float:
    """The fraction of the teacher's lead over the baseline that a student closes."""
    return (student - baseline) / max(1e-9, teacher - baseline)


def table(teacher: dict, results: list[dict], seeds: list[int], teacher_label: str) -> str:
    """Markdown: accuracy per model and question type (mean ± std over seeds), the teacher gap
    each student closes, per-seed figures, throughput."""
    students = [k for k in STUDENTS if k in results[0]]
    qtypes = sorted(teacher["per_type"])
    lines = [f"Accuracy on the held-out split, % (mean ± std over {len(results)} seed(s))", "",
             "| model | all | " + " | ".join(qtypes) + " | teacher gap closed |",
             "|---|---|" + "---|" * len(qtypes) + "---|",
             f"| {teacher_label} | {_ms([teacher['accuracy']])} | "
             + " | ".join(_ms([teacher["per_type"][q]]) for q in qtypes) + " | - |"]
    t_acc = teacher["accuracy"]
    for key in students:
        evals = [r[key]["eval"] for r in results]
        cells = [_ms([e["accuracy"] for e in evals])] + [_ms([e["per_type"].get(q, float("nan")) for e in evals])
                                                       for q in qtypes]
        gap = "-"
        if key != "no_distill":
            closed = [gap_closed(r[key]["eval"]["accuracy"], r["no_distill"]["eval"]["accuracy"], t_acc)
                      for r in results]
            gap = f"{100 * statistics.mean(closed):.0f}%" + (
                f" ({', '.join(f'{100 * c:.0f}' for c in closed)})" if len(closed) > 1 else "")
        lines.append(f"| {STUDENTS[key]} | " + " | ".join(cells) + f" | {gap} |")
    lines += ["", "Per seed (all, %): " + "; ".join(
        f"seed {s}: " + ", ".join(f"{k} {100 * r[k]['eval']['accuracy']:.1f}" for k in students)
        for s, r in zip(seeds, results))]
    tp = [r["throughput"] for r in results]
    lines += ["", "Inference throughput, questions/s (4 questions per image, batch 256, same run)", "",
              "| model | questions/s | vs teacher |", "|---|---|---|"]
    for key, label in (("teacher", "fusion teacher"), ("student_uncached", "DiDE student, uncached"),
                       ("student_cached", "DiDE student, image embeddings cached")):
        v = statistics.mean(t[key] for t in tp)
        ratio = statistics.mean(t[key] / t["teacher"] for t in tp)
        lines.append(f"| {label} | {v:.0f} | {ratio:.2f}x |")
    return "\n".join(lines)


def plot_curves(teacher_acc: float, results: list[dict], path: Path, title: str) -> None:
    """Held-out accuracy of each student against the step (mean over seeds, min-max shaded),
    the teacher as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axhline(100 * teacher_acc, color="k", ls="--", lw=1, label=f"fusion teacher ({100 * teacher_acc:.1f}%)")
    for key in (k for k in STUDENTS if k in results[0]):
        steps = [s for s, _ in results[0][key]["curve"]["accuracy"]]
        vals = 100 * np.array([[v for _, v in r[key]["curve"]["accuracy"]] for r in results])
        line, = ax.plot(steps, vals.mean(0), marker="o", ms=3, label=STUDENTS[key])
        if len(results) > 1:
            ax.fill_between(steps, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out VQA accuracy, %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from .train import command_description
    ap = argparse.ArgumentParser(prog="dide-demo", description=command_description(__doc__),
                                 formatter_class=DefaultsHelpFormatter)
    ap.add_argument("--out", default="runs/demo", help="run directory")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds of the students")
    ap.add_argument("--student-steps", type=int, default=1200, help="training steps of each student")
    ap.add_argument("--train-teachers", action="store_true",
                    help="train the two fusion teachers here (about 12 minutes on 2 cores) instead of loading the "
                         "shipped ones")
    ap.add_argument("--teacher-itm-steps", type=int, default=TEACHER_ITM_STEPS, help="with --train-teachers")
    ap.add_argument("--teacher-vqa-steps", type=int, default=TEACHER_VQA_STEPS, help="with --train-teachers")
    ap.add_argument("--two-stage", action="store_true",
                    help="add a student pre-trained on ITM with distillation from the ITM teacher "
                         "(--pretrain-steps), then fine-tuned with distillation (does not fit the 10-minute budget)")
    ap.add_argument("--pretrain-steps", type=int, default=2400, help="with --two-stage")
    ap.add_argument("--train-samples", type=int, default=20_000, help="demo training samples (written to OUT/data)")
    ap.add_argument("--val-samples", type=int, default=2_000,
                    help="held-out demo samples, on which the teacher and the students are scored")
    ap.add_argument("--config", default="demo", help="base config (the shipped demo.yaml)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every training run")
    add_version(ap)
    args = ap.parse_args(argv)
    quiet_libraries()
    from .metrics import setup_logging
    setup_logging(0)
    out = Path(args.out)
    data = out / "data"
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    make_data(data, args.train_samples, args.val_samples)
    if args.train_teachers:
        teachers = train_teachers(out / "teachers", data, args.teacher_itm_steps, args.teacher_vqa_steps,
                                  args.config, args.overrides)
        label = f"fusion teacher (ITM {args.teacher_itm_steps} + VQA {args.teacher_vqa_steps} steps, trained here)"
    else:
        teachers = shipped_teachers()
        log.info("using the shipped demo teachers (%s): ITM %d + VQA %d steps, seed 0; "
                 "`dide-demo --train-teachers` trains them here instead (about 12 minutes on 2 cores)",
                 SHIPPED_TEACHERS, TEACHER_ITM_STEPS, TEACHER_VQA_STEPS)
        label = f"fusion teacher (shipped: ITM {TEACHER_ITM_STEPS} + VQA {TEACHER_VQA_STEPS} steps)"
    teacher = evaluate_export(teachers[1], data)
    log.info("teacher held-out accuracy: %.2f%%", 100 * teacher["accuracy"])
    results = [run_seed(out, data, seed, teachers, args) for seed in seeds]
    md = table(teacher, results, seeds, label)
    md += f"\n\nWall time: {time.time() - t0:.0f} s on {torch.get_num_threads()} CPU thread(s)."
    plot_curves(teacher["accuracy"], results, out / "curves.png",
                f"dide-demo, {len(seeds)} seed(s): held-out accuracy" + (", mean, min-max shaded"
                                                                          if len(seeds) > 1 else ""))
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps({"teacher": teacher, "seeds": seeds, "students": results},
                                                 indent=2, default=str))
    print("\n" + md + f"\n\nHeld-out accuracy against the step: {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
