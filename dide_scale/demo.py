"""``dide-demo``: the whole method end to end on data the project draws itself.

1. write the demo shards (scenes of coloured shapes + questions) as webdataset tars;
2. train the fusion teacher (ground truth only);
3. train two dual-encoder students for the same steps on the same data: one on ground
   truth only, one with DiDE distillation (cross-modal attention KL + soft labels);
4. evaluate all three on the held-out split (accuracy per question type);
5. measure student vs teacher inference throughput, with and without cached images;
6. write ``results.md`` / ``results.json`` to the run directory and print the table.

Every run goes through ``dide_scale.train.run``: the DeepSpeed engine and the webdataset
reader of the cluster jobs, at world size 1.
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

log = logging.getLogger("dide_scale")


def _overrides(data: Path, out: Path, steps: int, seed: int, extra: list[str]) -> list[str]:
    return [f"data.train_shards={data}/vqa/train/{{00000..{_last(data / 'vqa' / 'train')}}}.tar",
            f"data.val_shards={data}/vqa/val/{{00000..{_last(data / 'vqa' / 'val')}}}.tar",
            f"train.output_dir={out}", f"train.max_steps={steps}", f"train.seed={seed}",
            f"train.eval_every={max(steps // 4, 1)}", *extra]


def _last(d: Path) -> str:
    from .data.shards import read_sizes
    return sorted(read_sizes(d))[-1][:-4]


def make_data(data: Path, n_train: int, n_val: int) -> None:
    from .data.demo import generate_split
    from .data.shards import read_sizes
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 10_000)):
        d = data / "vqa" / split
        if sum(read_sizes(d).values()) != n:
            generate_split(d, n, seed, "vqa", samples_per_shard=max(256, n // 10))
    log.info("demo shards: %s", data)


def train_one(name: str, overrides: list[str], config: str) -> dict:
    from . import distributed
    from .config import load_config
    from .engine import build_ds_config
    from .train import run
    env = distributed.detect()
    cfg = load_config(config, overrides, world_size=env.world_size)
    t0 = time.time()
    log.info("=== %s: %d steps ===", name, cfg.train.max_steps)
    summary = run(cfg, env, build_ds_config(cfg, env.world_size))
    summary["train_seconds"] = time.time() - t0
    return summary


def measure_throughput(run_dir: Path, data: Path, config: str, n: int = 256) -> dict:
    from .config import load_config
    from .data.pipeline import build_loader
    from .inference import compare_vqa_throughput
    from .models.saved import load_pretrained
    cfg = load_config(config, [f"data.val_shards={data}/vqa/val/00000.tar", "data.num_workers=0"])
    batch = next(iter(build_loader(cfg, "val", batch_size=n)))
    teacher = load_pretrained(run_dir / "teacher" / "export")
    student = load_pretrained(run_dir / "dide" / "export")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    from .models.images import from_batch
    return compare_vqa_throughput(student, teacher, from_batch(batch), batch["input_ids"], batch["attention_mask"],
                                  questions_per_image=4)


def run_seed(out: Path, data: Path, seed: int, teacher_steps: int, student_steps: int, config: str,
             extra: list[str] = ()) -> dict:
    d = out / f"seed{seed}"

    res = {}
    res["teacher"] = train_one("fusion teacher", _overrides(data, d / "teacher", teacher_steps, seed, extra) + [
        "student.kind=fusion"], config)
    if res["teacher"]["exit_code"]:
        raise RuntimeError("teacher training did not finish")
    res["no_distill"] = train_one("dual encoder, ground truth only", _overrides(
        data, d / "no_distill", student_steps, seed, extra), config)
    res["dide"] = train_one("dual encoder, DiDE distillation",
                            _overrides(data, d / "dide", student_steps, seed, extra) + [
        f"teacher.path={d / 'teacher' / 'export'}", "loss.attn_t2i=1.0", "loss.attn_i2t=1.0",
        "loss.soft_label=1.0", "loss.ground_truth=0.0"], config)
    res["throughput"] = measure_throughput(d, data, config)
    return res


def table(results: list[dict]) -> str:
    """Markdown: accuracy per model and question type (mean ± std over seeds), throughput."""
    def ms(vals):
        vals = [v * 100 for v in vals]
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"
    models = [("teacher", "fusion teacher (ViLT-style)"), ("no_distill", "dual encoder, no distillation"),
              ("dide", "dual encoder, DiDE")]
    qtypes = sorted({q for r in results for m, _ in models for q in r[m]["eval"]["per_type"]})
    lines = [f"Accuracy on the held-out split, % (mean ± std over {len(results)} seed(s))", "",
             "| model | all | " + " | ".join(qtypes) + " |", "|---|---|" + "---|" * len(qtypes)]
    for key, label in models:
        cells = [ms([r[key]["eval"]["accuracy"] for r in results])]
        cells += [ms([r[key]["eval"]["per_type"].get(q, float("nan")) for r in results]) for q in qtypes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tp = [r["throughput"] for r in results]
    lines += ["", "Inference throughput, questions/s (4 questions per image, batch 256, same run)", "",
              "| model | questions/s | vs teacher |", "|---|---|---|"]
    for key, label in (("teacher", "fusion teacher"), ("student_uncached", "DiDE student, uncached"),
                       ("student_cached", "DiDE student, image embeddings cached")):
        v = statistics.mean(t[key] for t in tp)
        ratio = statistics.mean(t[key] / t["teacher"] for t in tp)
        lines.append(f"| {label} | {v:.0f} | {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dide-demo", description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    ap.add_argument("--teacher-steps", type=int, default=2400)
    ap.add_argument("--student-steps", type=int, default=1200)
    ap.add_argument("--train-samples", type=int, default=20_000)
    ap.add_argument("--val-samples", type=int, default=2_000)
    ap.add_argument("--config", default="demo", help="base config (default: the shipped demo.yaml)")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args(argv)
    from .metrics import setup_logging
    setup_logging(0)
    out = Path(args.out)
    data = out / "data"
    t0 = time.time()
    make_data(data, args.train_samples, args.val_samples)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        results.append(run_seed(out, data, seed, args.teacher_steps, args.student_steps, args.config,
                                args.overrides))
    md = table(results)
    md += f"\n\nWall time: {time.time() - t0:.0f} s on {torch.get_num_threads()} CPU thread(s)."
    (out / "results.md").write_text(md + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
