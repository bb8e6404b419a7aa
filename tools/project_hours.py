#!/usr/bin/env python
"""Projected wall-clock hours of each step of the DiDE recipe (docs/REPRODUCE.md) on a cluster,
from the project's FLOP counter: a projection, not a measurement.

    python tools/project_hours.py                        # 8 nodes x 8 A100, 40% MFU
    python tools/project_hours.py --gpus 64 --peak-tflops 312 --mfu 0.4

For each shipped preset of the recipe: optimizer steps x global batch = training samples;
model FLOPs per sample from ``dide_scale.metrics.model_flops_per_sample`` (matmuls only: the
student's forward + backward, the teacher's forward on every row it scores, at the preset's
image geometry and ViLT-B/32's teacher shape); compute hours = samples x FLOPs / (GPUs x peak x
MFU).  The MFU is an assumption the caller states (default 0.4); the real one is what a run logs
as ``throughput/mfu``.  Beside it, the hours the data loaders need to decode the images at
``--decode-rate`` images per worker-second (170: BENCHMARKS.md section 2, measured on a 2-core
Xeon VM) with the preset's ``data.num_workers`` per GPU; the projection is the larger of the two.
Evaluation passes, start-up and checkpoint writes are not counted.
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

# (step of the recipe, preset, what its teacher is)
STEPS = [
    ("SNLI-VE teacher: fine-tune ViLT (fusion)", "finetune_snli_ve_teacher", None),
    ("Pre-train with distillation (ITM teacher)", "pretrain_b32", "vilt"),
    ("Fine-tune VQAv2 with distillation", "finetune_vqa", "vilt"),
    ("Fine-tune NLVR2 with distillation", "finetune_nlvr2", "vilt"),
    ("Fine-tune SNLI-VE with distillation", "finetune_snli_ve", "vilt"),
]
# ViLT-B/32: every teacher of the recipe has this shape (the SNLI-VE teacher is fine-tuned from it)
VILT_B32 = SimpleNamespace(width=768, depth=12, mlp_ratio=4.0, patch_size=32)


def project(gpus: int, peak_tflops: float, mfu: float, decode_rate: float = 170.0) -> list[dict]:
    from dide_scale.config import load_config
    from dide_scale.metrics import model_flops_per_sample
    rows = []
    for step, preset, teacher in STEPS:
        cfg = load_config(preset)
        flops = model_flops_per_sample(cfg, VILT_B32 if teacher else None)
        samples = cfg.train.max_steps * cfg.train.global_batch_size
        total = samples * flops["total"]
        compute = total / (gpus * peak_tflops * 1e12 * mfu) / 3600
        images = samples * (2 if cfg.train.task == "nlvr2" else 1)
        data = images / (gpus * cfg.data.num_workers * decode_rate) / 3600
        rows.append({"step": step, "preset": preset, "steps": cfg.train.max_steps,
                     "global_batch": cfg.train.global_batch_size, "samples": samples,
                     "student_gflop": flops["student"] / 1e9, "teacher_gflop": flops["teacher"] / 1e9,
                     "total_eflop": total / 1e18, "compute_hours": compute, "data_hours": data,
                     "hours": max(compute, data)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--gpus", type=int, default=64, help="GPUs in the job (default 64: 8 nodes x 8)")
    ap.add_argument("--peak-tflops", type=float, default=312.0, help="dense bf16 peak per GPU (A100: 312)")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    ap.add_argument("--decode-rate", type=float, default=170.0,
                    help="images decoded per data-loader worker per second (default 170, BENCHMARKS.md section 2)")
    args = ap.parse_args(argv)
    rows = project(args.gpus, args.peak_tflops, args.mfu, args.decode_rate)
    print(f"Projection for {args.gpus} GPUs at {args.peak_tflops:g} TFLOP/s peak, an assumed MFU of {args.mfu:.0%} "
          f"and {args.decode_rate:g} images per loader worker-second (training steps only):\n")
    print("| step | preset | steps x batch | GFLOP/sample student + teacher | EFLOP | compute h | data h | "
          "projected h |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | `{r['preset']}` | {r['steps']:,} x {r['global_batch']} | "
              f"{r['student_gflop']:.0f} + {r['teacher_gflop']:.0f} | {r['total_eflop']:.2f} | "
              f"{r['compute_hours']:.2f} | {r['data_hours']:.2f} | {r['hours']:.2f} |")
    print(f"| total | | | | {sum(r['total_eflop'] for r in rows):.2f} | | | {sum(r['hours'] for r in rows):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
