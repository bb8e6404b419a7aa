#!/usr/bin/env python
"""Training-step benchmark: distillation step vs student-only step, same engine, same run.

Reports per step: data wait, teacher forward, student forward, student backward,
optimizer; samples/s; model FLOPs per sample (formula in dide_scale/metrics.py) and MFU
when the device peak is known; peak memory.  The measured time ratio distill/student-only
is printed next to the FLOP ratio of the two.

    python tools/bench_train.py --preset debug --batch 64 --steps 20
    python tools/bench_train.py --preset b32 --batch 2 --steps 3          # ViT-B/32 + ViLT-B/32 shapes
    python tools/bench_train.py --preset b32 --batch 64 --precision bf16 --zero 2   # on a GPU

Inputs are synthetic in-memory batches (the data pipeline has its own benchmark), so
data wait here is the host->device copy only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402

from dide_scale.bench import PRESETS, data_overrides, synthetic_images  # noqa: E402


def arch_overrides(prefix: str, arch: dict) -> list[str]:
    return [f"{prefix}.{k}={json.dumps(v)}" for k, v in arch.items()]


def synthetic_batch(preset: str, batch: int, task: str, num_classes: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    arch = PRESETS[preset]
    ids = torch.randint(5, arch["vocab_size"], (batch, arch["max_text_len"]), generator=g)
    mask = torch.ones_like(ids)
    mask[:, arch["max_text_len"] * 3 // 4:] = 0  # some padding, as real captions have
    images = synthetic_images(preset, batch, g)
    out = {"patches": images.patches, "patch_coord": images.coord, "patch_valid": images.valid,
           "input_ids": ids, "attention_mask": mask}
    if task == "nlvr2":
        second = synthetic_images(preset, batch, g)
        out.update(patches2=second.patches, patch_coord2=second.coord, patch_valid2=second.valid)
    if task == "vqa":
        out["labels"] = (torch.rand(batch, num_classes, generator=g) > 0.97).float()
    elif task != "itm":
        out["labels"] = torch.randint(0, num_classes, (batch,), generator=g)
    return out


def measure(cfg, teacher_dir: str | None, batch: int, steps: int, warmup: int) -> dict:
    from dide_scale import engine
    from dide_scale.build import build_student, build_teacher
    from dide_scale.metrics import model_flops_per_sample, peak_flops
    from dide_scale.objective import DistillObjective
    from dide_scale.trainer import train_step
    torch.manual_seed(0)
    student = build_student(cfg)
    teacher = build_teacher(cfg) if teacher_dir else None
    engines = engine.build_engines(cfg, engine.build_ds_config(cfg, 1), student, teacher)
    obj = DistillObjective(engines.student, engines.teacher, cfg.loss, cfg.train.task, sync=engine.synchronize)
    obj.train()
    data = synthetic_batch(PRESET_USED[0], batch, cfg.train.task, cfg.num_classes())

    def batches():
        while True:
            yield data
    it = batches()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    per_step = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        times = train_step(engines, obj, it, 1, timed=True).times
        engine.synchronize()
        times["total"] = time.perf_counter() - t0
        if i >= warmup:
            per_step.append(times)
    med = {k: statistics.median(s[k] for s in per_step) for k in per_step[0]}
    flops = model_flops_per_sample(cfg, teacher)
    sps = batch / med["total"]
    peak = peak_flops()
    out = {"seconds": med, "samples_per_s": sps, "flops_per_sample": flops,
           "mfu": sps * flops["total"] / peak if peak else None}
    import psutil
    out["peak_host_rss_gb"] = psutil.Process().memory_info().rss / 2 ** 30
    if torch.cuda.is_available():
        out["peak_device_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    del engines, obj, student, teacher
    return out


PRESET_USED: list[str] = []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="debug")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--task", default="vqa", choices=["itm", "vqa", "nlvr2", "snli_ve"])
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--zero", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    import tempfile

    from dide_scale import distributed, engine
    from dide_scale.config import load_config
    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.saved import save_pretrained
    from dide_scale.models.student import TowerShape
    arch = PRESETS[args.preset]
    PRESET_USED.append(args.preset)
    engine.init_distributed(distributed.detect(), 600)
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    n_cls = {"vqa": 3129, "itm": 2, "nlvr2": 2, "snli_ve": 3}[args.task]
    teacher_dir = f"{tmp}/teacher"
    t = FusionEncoder(TowerShape(**arch), args.task, n_cls)
    t.labels = [f"answer {i}" for i in range(n_cls)] if args.task == "vqa" else \
        {"itm": None, "nlvr2": ["False", "True"], "snli_ve": ["entailment", "neutral", "contradiction"]}[args.task]
    save_pretrained(t, teacher_dir)
    answers = f"{tmp}/answers.json"
    with open(answers, "w") as f:
        json.dump([f"answer {i}" for i in range(n_cls)], f)
    base = [*arch_overrides("student.arch", arch), *arch_overrides("teacher.arch", arch), *data_overrides(args.preset),
            f"data.answer_vocab={answers if args.task == 'vqa' else ''}",
            f"train.task={args.task}", f"data.num_answers={n_cls}", f"train.precision={args.precision}",
                       f"train.zero_stage={args.zero}", f"train.global_batch_size={args.batch}",
                       f"train.micro_batch_size={args.batch}", f"train.output_dir={tmp}/run", "data.tokenizer=x"]
    gt = "loss.itc=1.0" if args.task == "itm" else "loss.ground_truth=1.0"
    only = load_config("debug", base + ["loss.attn_t2i=0", "loss.attn_i2t=0", "loss.soft_label=0",
                                        "loss.ground_truth=0", gt])
    distill = load_config("debug", base + [f"teacher.path={teacher_dir}", "loss.attn_t2i=1", "loss.attn_i2t=1",
                                           "loss.soft_label=1", gt])
    res = {"student_only": measure(only, None, args.batch, args.steps, args.warmup),
           "distill": measure(distill, teacher_dir, args.batch, args.steps, args.warmup)}
    t_ratio = res["distill"]["seconds"]["total"] / res["student_only"]["seconds"]["total"]
    f_ratio = res["distill"]["flops_per_sample"]["total"] / res["student_only"]["flops_per_sample"]["total"]
    machine = (torch.cuda.get_device_name() if torch.cuda.is_available()
               else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
                    f"{torch.get_num_threads()}")
    res.update(preset=args.preset, batch=args.batch, task=args.task, precision=args.precision, zero=args.zero,
               machine=machine, torch=torch.__version__, time_ratio=t_ratio, flop_ratio=f_ratio)
    print(f"\n{args.preset} task={args.task} batch={args.batch} {args.precision} ZeRO-{args.zero} on {machine}")
    print("| step | total s | data wait | teacher fwd | student fwd | student bwd | optimizer | samples/s | "
          "GFLOP/sample | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in ("student_only", "distill"):
        r = res[name]
        s = r["seconds"]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a (CPU)"
        print(f"| {name} | {s['total']:.4f} | {s['data_wait']:.4f} | {s['teacher_forward']:.4f} | "
              f"{s['student_forward']:.4f} | {s['student_backward']:.4f} | {s['optimizer']:.4f} | "
              f"{r['samples_per_s']:.1f} | {r['flops_per_sample']['total'] / 1e9:.3f} | {mfu} |")
    print(f"\ndistill / student-only: time {t_ratio:.2f}x, FLOPs {f_ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
