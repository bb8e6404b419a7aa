#!/usr/bin/env python
"""Inference speed: the DiDE dual-encoder student vs its fusion teacher, side by side.

Paper shapes by default (B/32 width and depth for both, 4:3 photos at ViLT's geometry:
384x512 = 192 patches in 228 slots, 40 text tokens).  Both models use the same timm blocks
with fused SDPA attention, so the comparison measures the architecture, not two implementations.

  (a) uncached: every question pays for its image (equal token counts per forward);
  (b) VQA with image embeddings cached, Q questions per image: the student runs only its
      text tower + fusion MLP per question, the teacher a full joint forward;
  (c) retrieval of N images x M texts: N + M tower passes + N*M MLPs vs N*M joint forwards.

    python tools/bench_inference.py                    # paper shapes, CPU-friendly sizes
    python tools/bench_inference.py --preset demo --batch 64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from dide_scale.bench import IMAGES, PRESETS, synthetic_images


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="b32")
    ap.add_argument("--batch", type=int, default=8, help="questions per timed call in (a) and (b)")
    ap.add_argument("--questions-per-image", type=int, default=4)
    ap.add_argument("--retrieval", type=int, nargs=2, default=[8, 8], metavar=("N_IMAGES", "M_TEXTS"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    from dide_scale.inference import DualEncoderInference, compare_vqa_throughput, throughput
    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.student import DualEncoder, TowerShape
    arch = PRESETS[args.preset]
    shape = TowerShape(**arch)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    student = DualEncoder(shape, "itm", 2)
    teacher = FusionEncoder(shape, "itm", 2)
    h, w = IMAGES[args.preset][0]
    L = arch["max_text_len"]
    g = torch.Generator().manual_seed(0)

    def texts(n):
        ids = torch.randint(5, arch["vocab_size"], (n, L), generator=g)
        return ids, torch.ones_like(ids)
    n_img = max(1, args.batch // args.questions_per_image)
    pixels = synthetic_images(args.preset, args.batch, g)
    ids, mask = texts(args.batch)
    res = {}
    ab = compare_vqa_throughput(student, teacher, pixels, ids, mask, questions_per_image=1, device=dev, dtype=dtype,
                                repeats=args.repeats, sync=sync)
    res["a_uncached"] = {"teacher": ab["teacher"], "student": ab["student_uncached"],
                         "speedup": ab["speedup_uncached"]}
    vb = compare_vqa_throughput(student, teacher, pixels[:n_img], ids, mask,
                                questions_per_image=args.questions_per_image, device=dev, dtype=dtype,
                                repeats=args.repeats, sync=sync, ablate_cls_only=True)
    res["b_vqa_cached"] = {"teacher": vb["teacher"], "student": vb["student_cached"], "speedup": vb["speedup_cached"]}
    full = vb["student_cached_full_last_block"]
    res["b_vqa_cached_full_last_block"] = {"teacher": vb["teacher"], "student": full, "speedup": full / vb["teacher"]}
    # (c) retrieval N x M
    n, m = args.retrieval
    inf = DualEncoderInference(student, dev, dtype)
    teacher = teacher.eval().to(dev, dtype)
    r_pix = synthetic_images(args.preset, n, g)
    r_ids, r_mask = (t.to(dev) for t in texts(m))

    def student_retrieval():
        return inf.pair_scores(inf.encode_texts(r_ids, r_mask), inf.encode_images(r_pix))

    @torch.inference_mode()
    def teacher_retrieval():
        pix = inf._images(r_pix)
        for i in range(n):  # every image against all texts, one batched joint forward per image
            teacher(pix[[i] * m], r_ids, r_mask)
    pairs = n * m
    r = throughput({"student": student_retrieval, "teacher": teacher_retrieval}, pairs, rounds=args.repeats, sync=sync)
    res["c_retrieval"] = {"teacher": r["teacher"], "student": r["student"], "speedup": r["student"] / r["teacher"],
                          "images": n, "texts": m}
    machine = (torch.cuda.get_device_name() if dev.type == "cuda"
               else f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    res.update(preset=args.preset, dtype=args.dtype, batch=args.batch, questions_per_image=args.questions_per_image,
               machine=machine, torch=torch.__version__, when=time.strftime("%Y-%m-%d"))
    print(f"\n{args.preset}: images {h}x{w}, {L} text tokens, {args.dtype} on {machine}")
    print("| case | teacher items/s | student items/s | student / teacher |")
    print("|---|---|---|---|")
    labels = {"a_uncached": f"(a) uncached, batch {args.batch}",
              "b_vqa_cached": f"(b) VQA, image embeddings cached, {args.questions_per_image} questions/image",
              "b_vqa_cached_full_last_block": "(b) the same, text tower's last block over every token (ablation)",
              "c_retrieval": f"(c) retrieval {n} images x {m} texts (pairs/s)"}
    for k, label in labels.items():
        r = res[k]
        print(f"| {label} | {r['teacher']:.2f} | {r['student']:.2f} | {r['speedup']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
