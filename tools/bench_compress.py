#!/usr/bin/env python
"""Compression into a small fusion student (DistillVLM) on the demo task, several seeds.

The demo's VQA fusion teacher (the one shipped in the package, or --teacher DIR), then per
seed three small fusion students trained for the same steps on the same data:

  no_distill     ground truth only
  attn_mse       ground truth + layer-to-layer attention MSE
  attn_mse_nce   ground truth + attention MSE + token-wise NCE against a teacher-token queue

Every run goes through ``dide_scale.train.run`` (DeepSpeed engine, webdataset reader).
Reported: held-out accuracy per question type (mean ± std over seeds), parameters, and
inference throughput of teacher and student measured side by side in one process.

    python tools/bench_compress.py --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dide_scale.demo import evaluate_export, make_data, shard_overrides, shipped_teachers, train_run
from dide_scale.inference import throughput

VARIANTS = {
    "no_distill": ("small fusion, no distillation", []),
    "attn_mse": ("small fusion, attention MSE", ["loss.attn_mse=1.0"]),
    "attn_mse_nce": ("small fusion, attention MSE + token NCE", ["loss.attn_mse=1.0", "loss.token_nce=1.0"]),
}


def student_overrides(args) -> list[str]:
    arch = (f"{{width: {args.width}, depth: {args.depth}, heads: {args.heads}, patch_size: 8, "
            f"image_size: [32, 32], max_text_len: 16, vocab_size: 128}}")
    return ["student.kind=fusion", f"student.arch={arch}", f"loss.nce_queue_size={args.queue}",
            f"loss.nce_temperature={args.nce_temperature}"]


def measure(teacher_path: Path, student_path: Path, data: Path, n: int = 256) -> dict:
    """Questions/s of teacher and student on one batch, timed alternately in this process."""
    from dide_scale.config import load_config
    from dide_scale.data.pipeline import build_loader
    from dide_scale.models.saved import load_pretrained
    from dide_scale.objective import batch_to_device
    cfg = load_config("demo", [f"data.val_shards={data}/vqa/val/00000.tar", "data.num_workers=0"])
    b = batch_to_device(next(iter(build_loader(cfg, "val", batch_size=n))), torch.device("cpu"), torch.float32)
    pix = b["images"]
    models = {"teacher": load_pretrained(teacher_path).eval(), "student": load_pretrained(student_path).eval()}
    out = {f"{k}_params": sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    with torch.inference_mode():
        qps = throughput({k: (lambda m=m: m(pix, b["input_ids"], b["attention_mask"])) for k, m in models.items()},
                         n, rounds=7)
    out.update({f"{k}_qps": v for k, v in qps.items()})
    return out


def table(results: list[dict], args) -> str:
    def ms(vals):
        vals = [100 * v for v in vals]
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"
    t = results[0]["teacher_shape"]
    rows = [("teacher", f"fusion teacher ({t['width']} wide, {t['depth']} blocks)")] + \
        [(k, VARIANTS[k][0]) for k in args.variants.split(",")]
    qtypes = sorted({q for r in results for k, _ in rows for q in r[k]["per_type"]})
    tp = [r["throughput"] for r in results]
    t_params, s_params = tp[0]["teacher_params"], tp[0]["student_params"]
    t_qps = statistics.mean(t["teacher_qps"] for t in tp)
    s_ratio = statistics.mean(t["student_qps"] / t["teacher_qps"] for t in tp)
    lines = [f"Held-out accuracy, % (mean ± std over {len(results)} seed(s)); student: {args.width} wide, "
             f"{args.depth} blocks, {args.heads} heads; {args.student_steps} steps each", "",
             "| model | params | questions/s | vs teacher | all | " + " | ".join(qtypes) + " |",
             "|---|---|---|---|---|" + "---|" * len(qtypes)]
    for key, label in rows:
        params = t_params if key == "teacher" else s_params
        qps = t_qps if key == "teacher" else t_qps * s_ratio
        ratio = 1.0 if key == "teacher" else s_ratio
        cells = [f"{params / 1e3:.0f}K", f"{qps:.0f}", f"{ratio:.2f}x", ms([r[key]["accuracy"] for r in results])]
        cells += [ms([r[key]["per_type"].get(q, float("nan")) for r in results]) for q in qtypes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="runs/compress")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--teacher", default="", help="an exported VQA fusion teacher (default: the shipped demo teacher)")
    ap.add_argument("--student-steps", type=int, default=1200)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--queue", type=int, default=4096)
    ap.add_argument("--nce-temperature", type=float, default=0.07)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    from dide_scale.metrics import setup_logging
    setup_logging(0)
    out = Path(args.out)
    data = out / "data"
    make_data(data, 20_000, 2_000)
    tdir = Path(args.teacher) if args.teacher else shipped_teachers()[1]
    teacher = evaluate_export(tdir, data)
    t0 = time.time()
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        res = {"seed": seed, "teacher": teacher}
        for key in args.variants.split(","):
            extra = student_overrides(args) + VARIANTS[key][1]
            if VARIANTS[key][1]:
                extra.append(f"teacher.path={tdir}")
            run = train_run(key, out / f"seed{seed}" / key, [*shard_overrides(data), *extra], args.student_steps, seed)
            res[key] = json.loads((run / "summary.json").read_text())["eval"]
        first = args.variants.split(",")[0]  # every variant has the same architecture
        res["throughput"] = measure(tdir, out / f"seed{seed}" / first / "export", data)
        res["teacher_shape"] = json.loads((tdir / "config.json").read_text())["shape"]
        results.append(res)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    md = table(results, args)
    md += (f"\n\nMachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU thread(s); "
           f"throughput at batch 256, fp32, teacher and student timed alternately in one process. "
           f"Wall time {time.time() - t0:.0f} s.")
    (out / "results.md").write_text(md + "\n")
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
