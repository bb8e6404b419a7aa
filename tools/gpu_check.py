#!/usr/bin/env python
"""Every GPU figure of the distillation step and of inference, in one run, as one markdown
report: meant for a single call on a lent H100/H200 (about 6 minutes there), and dry-run on
CPU first so that the call measures instead of debugging.

    python tools/gpu_check.py --out gpu_report            # on the GPU machine
    python tools/gpu_check.py --out /tmp/gpu --dry-run    # here: tiny shapes, fp32, CPU

What it runs, each bench in its own process (an out-of-memory or a crash ends that row, not
the report):

1. ``bench_train.py --preset b32`` (ViT-B/32 towers, ViLT-B/32-size teacher, 4:3 photos at
   ViLT's geometry, 40 tokens) in bf16 with ZeRO-2 and with ZeRO-3 (the teacher partitioned):
   samples/s, MFU, the step-time split, peak memory, distill vs student-only time next to
   their FLOP ratio;
2. the largest micro-batch that fits (doubling from ``--batch`` until a run fails, ZeRO-2);
3. ``bench_inference.py`` in bf16: uncached, cached-image VQA and retrieval, student vs
   teacher.

The device image lacks deepspeed, webdataset and submitit: ``tools/gpu_wheels.sh`` downloads
them as wheels into ``.whl/`` here, and the device command installs them first (its first
line is printed by ``tools/gpu_wheels.sh``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent


def bench(script: str, args: list[str], out: Path, name: str, timeout: float) -> dict | None:
    """One bench in its own process; its JSON, or None (the log says why)."""
    path = out / f"{name}.json"
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu" if "--dry-run" in sys.argv else "cuda")
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        try:
            rc = subprocess.run([sys.executable, str(TOOLS / script), *args, "--json", str(path)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    print(f"{name}: {'ok' if rc == 0 else f'failed ({rc})'} in {time.time() - t0:.0f} s", flush=True)
    return json.loads(path.read_text()) if rc == 0 and path.exists() else None


def train_rows(name: str, r: dict | None) -> list[str]:
    if r is None:
        return [f"| {name} | failed: see {name}.log |" + " |" * 9]
    rows = []
    for kind in ("student_only", "distill"):
        x, s = r[kind], r[kind]["seconds"]
        mfu = f"{x['mfu']:.1%}" if x.get("mfu") else "n/a"
        mem = f"{x['peak_device_gb']:.1f}" if "peak_device_gb" in x else "n/a"
        rows.append(f"| {name} {kind} | {r['batch']} | {x['samples_per_s']:.1f} | {mfu} | {s['data_wait'] * 1e3:.1f} | "
                    f"{s['teacher_forward'] * 1e3:.1f} | {s['student_forward'] * 1e3:.1f} | "
                    f"{s['student_backward'] * 1e3:.1f} | {s['optimizer'] * 1e3:.1f} | {mem} |")
    rows.append(f"| {name}: distill / student-only | | time {r['time_ratio']:.2f}x | FLOPs {r['flop_ratio']:.2f}x "
                "| | | | | | |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_report")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, fp32, on CPU: check the script itself")
    ap.add_argument("--batch", type=int, default=64, help="micro-batch of the step benches (doubled in the search)")
    ap.add_argument("--max-batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    preset, prec = ("debug", "fp32") if args.dry_run else ("b32", "bf16")
    batch = 4 if args.dry_run else args.batch
    steps = ["--steps", str(2 if args.dry_run else args.steps), "--warmup", "1" if args.dry_run else "3"]
    common = ["--preset", preset, "--precision", prec, *steps]
    t0 = time.time()
    train = {z: bench("bench_train.py", [*common, "--batch", str(batch), "--zero", str(z)], out, f"train_zero{z}", 300)
             for z in (2, 3)}
    fits, b = [], batch
    limit = 16 if args.dry_run else args.max_batch
    while b * 2 <= limit:  # the largest micro-batch that fits: double until a run fails
        b *= 2
        r = bench("bench_train.py", ["--preset", preset, "--precision", prec, "--steps", "1", "--warmup", "1",
                                     "--batch", str(b), "--zero", "2"], out, f"fit_{b}", 300)
        if r is None:
            break
        fits.append((b, r))
    inference = bench("bench_inference.py", ["--preset", preset, "--dtype", prec, "--repeats", "3"]
                      + (["--device", "cpu"] if args.dry_run else []), out, "inference", 300)

    import torch
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"{platform.processor() or platform.machine()} (CPU, dry run)"
    lines = [f"# GPU check: {machine}", "",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}, Python {platform.python_version()}; "
             f"preset {preset}, {prec}; wall time {time.time() - t0:.0f} s", "",
             "## Distillation step (`tools/bench_train.py`), medians, ms", "",
             "| run | micro-batch | samples/s | MFU | data wait | teacher fwd | student fwd | student bwd | "
             "optimizer | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for z, r in train.items():
        lines += train_rows(f"ZeRO-{z}", r)
    lines += ["", "## Largest micro-batch (ZeRO-2, distill step)", ""]
    if fits:
        for b, r in fits:
            d = r["distill"]
            mfu = f"{d['mfu']:.1%}" if d.get("mfu") else "n/a"
            mem = f"{d['peak_device_gb']:.1f} GiB" if "peak_device_gb" in d else "n/a"
            lines.append(f"- {b}: {d['samples_per_s']:.1f} samples/s, MFU {mfu}, peak {mem}")
        lines.append(f"- largest that ran: {fits[-1][0]} (search stopped at {limit} or at the first failure)")
    else:
        lines.append(f"- nothing above {batch} ran; see fit_*.log")
    lines += ["", "## Inference (`tools/bench_inference.py`)", ""]
    if inference is None:
        lines.append("failed: see inference.log")
    else:
        lines += ["| case | teacher | student | student / teacher |", "|---|---|---|---|"]
        for k in ("a_uncached", "b_vqa_cached", "b_vqa_cached_full_last_block", "c_retrieval"):
            if k in inference:
                x = inference[k]
                lines.append(f"| {k} | {x['teacher']:.1f} | {x['student']:.1f} | {x['speedup']:.2f}x |")
    report = "\n".join(lines) + "\n"
    (out / "report.md").write_text(report)
    print(report)
    return 0 if all(train.values()) and inference is not None else 1


if __name__ == "__main__":
    sys.exit(main())
