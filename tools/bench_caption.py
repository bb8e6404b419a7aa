#!/usr/bin/env python
"""DistillVLM's headline result on the demo task: a small captioner distilled from a fusion
teacher, scored by CIDEr-D.

Data: the demo's scenes as a caption task (``dide-data demo --tasks caption``): each image's
caption plus four paraphrases as its references.  Per seed:

  teacher              a fusion captioner (configs/caption_demo.yaml: 64 wide, 3 blocks,
                       4 heads), ground truth only
  no_distill           a small fusion captioner (32 wide, 2 blocks, 4 heads), ground truth only
  attn_mse             + DistillVLM's attention MSE (every student block <- its mapped
                       teacher block, under the seq2seq mask)
  attn_mse_nce         + token-wise NCE against a queue of teacher token states
  attn_mse_nce_soft    + soft targets: KL to the teacher's distribution on the masked tokens
  attn_mse_nce_light   attn_mse_nce with the NCE term at weight 0.1 instead of 1

every student for the same steps on the same data, ground truth weight 1 in every run.  Every
run goes through ``dide_scale.train.run`` (DeepSpeed engine, webdataset reader).  Each final
export decodes the held-out images once with the same settings (greedy by default, cached)
and is scored with pycocoevalcap: CIDEr-D, BLEU-4, METEOR, ROUGE-L.  Captions/s of teacher
and student (and of the teacher without the decoding cache) are timed alternately in one
process on one batch.

    OMP_NUM_THREADS=1 python tools/bench_caption.py --out runs/caption --seeds 0,1,2
    OMP_NUM_THREADS=1 python tools/bench_caption.py --paper-shapes   # decoding speed at compress_caption's shapes

Seeds can run side by side, one process per ``--seeds N`` on the same ``--out``; a last
invocation with every seed reads the finished runs and scores back and prints the table.
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

VARIANTS = {
    "no_distill": ("small captioner, no distillation", []),
    "attn_mse": ("small captioner, attention MSE", ["loss.attn_mse=1.0"]),
    "attn_mse_nce": ("small captioner, attention MSE + token NCE", ["loss.attn_mse=1.0", "loss.token_nce=1.0"]),
    "attn_mse_nce_soft": ("small captioner, attention MSE + token NCE + soft targets",
                          ["loss.attn_mse=1.0", "loss.token_nce=1.0", "loss.soft_label=1.0"]),
    # the NCE term ends several times larger than the ground truth at weight 1: does it crowd it out?
    "attn_mse_nce_light": ("small captioner, attention MSE + token NCE at weight 0.1",
                           ["loss.attn_mse=1.0", "loss.token_nce=0.1"]),
}
DEFAULT_VARIANTS = ("no_distill", "attn_mse", "attn_mse_nce", "attn_mse_nce_soft", "attn_mse_nce_light")
METRICS = ("cider", "bleu4", "meteor", "rouge_l")


def make_data(data: Path, n_train: int, n_val: int) -> None:
    """The caption shards, written once (seed processes started side by side wait for the first)."""
    import fcntl

    from dide_scale.data.demo import generate_split
    from dide_scale.data.shards import read_sizes
    data.mkdir(parents=True, exist_ok=True)
    with open(data / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for split, n, seed in (("train", n_train, 0), ("val", n_val, 10_000)):
            d = data / split
            if sum(read_sizes(d).values()) != n:
                generate_split(d, n, seed, "caption", samples_per_shard=max(256, n // 10))


def shards(d: Path) -> str:
    from dide_scale.data.shards import shard_pattern
    return shard_pattern(d)


def run(name: str, run_dir: Path, overrides: list[str], steps: int, seed: int, args) -> Path:
    """One training run on caption_demo (skipped when its export exists: an interrupted
    benchmark resumes); no in-training evaluation, the export is scored afterwards."""
    from dide_scale.demo import train_one
    if not (run_dir / "export" / "config.json").exists():
        summary = train_one(name, [f"data.train_shards={shards(args.data / 'train')}", "data.val_shards=",
                                   f"train.output_dir={run_dir}", f"train.max_steps={steps}", f"train.seed={seed}",
                                   *overrides, *args.overrides], "caption_demo")
        if summary["exit_code"]:
            raise RuntimeError(f"{name} did not finish (exit code {summary['exit_code']})")
    return run_dir / "export"


def student_overrides(args, teacher: Path, extra: list[str]) -> list[str]:
    arch = (f"{{width: {args.width}, depth: {args.depth}, heads: {args.heads}, patch_size: 8, "
            f"image_size: [32, 32], max_text_len: 24, vocab_size: 128}}")
    out = [f"student.arch={arch}", f"loss.nce_queue_size={args.queue}", *extra]
    return out + [f"teacher.path={teacher}"] if extra else out


def settings(args):
    from dide_scale.models.caption import Generation
    return Generation(args.beam, args.max_length, args.length_penalty)


def score(export: Path, args) -> dict:
    """Decode the held-out split with the benchmark's settings and score it."""
    from dide_scale.captions import evaluate_captions
    from dide_scale.config import load_config
    from dide_scale.data.pipeline import build_loader
    from dide_scale.data.transforms import load_tokenizer
    from dide_scale.models.saved import load_pretrained
    cfg = load_config("caption_demo", [f"data.val_shards={shards(args.data / 'val')}", "data.num_workers=0"])
    t0 = time.time()
    res = evaluate_captions(load_pretrained(export).eval(), build_loader(cfg, "val", batch_size=256),
                            load_tokenizer(cfg.data.tokenizer), settings(args), "cpu")
    return {**res["per_type"], "n": res["n"], "examples": res["predictions"][:3], "eval_seconds": time.time() - t0}


def measure(teacher: Path, student: Path, args, n: int = 256) -> dict:
    """Captions/s of teacher and student (and of the teacher decoding without the cache), timed
    in alternation on one batch of held-out images, same decoding settings."""
    import torch

    from dide_scale.config import load_config
    from dide_scale.data.pipeline import build_loader
    from dide_scale.data.transforms import load_tokenizer
    from dide_scale.inference import throughput
    from dide_scale.models.caption import SpecialTokens, generate
    from dide_scale.models.saved import load_pretrained
    from dide_scale.objective import batch_to_device
    cfg = load_config("caption_demo", [f"data.val_shards={shards(args.data / 'val')}", "data.num_workers=0"])
    b = batch_to_device(next(iter(build_loader(cfg, "val", batch_size=n))), torch.device("cpu"), torch.float32)
    tokens, s = SpecialTokens.of(load_tokenizer(cfg.data.tokenizer)), settings(args)
    models = {"teacher": load_pretrained(teacher).eval(), "student": load_pretrained(student).eval()}
    fns = {k: (lambda m=m: generate(m, b["images"], tokens, s, early_stop=False)) for k, m in models.items()}
    fns["teacher_uncached"] = lambda: generate(models["teacher"], b["images"], tokens, s, cached=False,
                                               early_stop=False)
    out = {f"{k}_params": sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    out.update({f"{k}_cps": v for k, v in throughput(fns, len(b["images"]), rounds=args.rounds).items()})
    return out


def paper_shapes(args) -> str:
    """Captions/s of compress_caption's teacher (ViLT-B/32's shapes) and student (12 x 384) with
    random weights, decoding at the preset's settings (beam 5, 20 tokens, every step run),
    timed alternately on one batch of random 384 x 384 images (the uncached decoder, some
    hundred times the work at these shapes, is timed on the demo's models only)."""
    import torch

    from dide_scale.build import generation
    from dide_scale.config import load_config
    from dide_scale.inference import throughput
    from dide_scale.models.caption import SpecialTokens, generate
    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.images import images_from_pixels
    from dide_scale.models.student import TowerShape
    cfg = load_config("compress_caption")
    torch.manual_seed(0)
    models = {k: FusionEncoder(TowerShape.from_arch(a), "caption", a.vocab_size).eval()
              for k, a in (("teacher", cfg.teacher.arch), ("student", cfg.student.arch))}
    images = images_from_pixels(torch.rand(args.paper_batch, 3, 384, 384), 32)
    tokens = SpecialTokens(bos=101, eos=102, pad=0, mask=103)  # bert-base-uncased's ids
    s = generation(cfg)
    fns = {k: (lambda m=m: generate(m, images, tokens, s, early_stop=False)) for k, m in models.items()}
    with torch.inference_mode():
        cps = throughput(fns, args.paper_batch, warmup=1, rounds=args.rounds)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    lines = [f"compress_caption's shapes, random weights: {args.paper_batch} images of 384 x 384 (144 patches), "
             f"beam {s.beam_size}, {s.max_length} tokens, fp32, {torch.get_num_threads()} CPU thread(s)", "",
             "| model | params | captions/s | vs teacher |", "|---|---|---|---|"]
    for k, label in (("teacher", "teacher, 12 x 768"), ("student", "student, 12 x 384")):
        n = params["student" if k == "student" else "teacher"]
        lines.append(f"| {label} | {n / 1e6:.1f}M | {cps[k]:.2f} | {cps[k] / cps['teacher']:.2f}x |")
    return "\n".join(lines)


def run_seed(seed: int, args) -> dict:
    d = args.out / f"seed{seed}"
    path = d / "result.json"
    res = json.loads(path.read_text()) if path.exists() else {"seed": seed}
    teacher = run("teacher", d / "teacher", [], args.teacher_steps, seed, args)
    for key in ["teacher", *args.variant_list]:
        if key not in res:
            export = teacher if key == "teacher" else run(
                key, d / key, student_overrides(args, teacher, VARIANTS[key][1]), args.student_steps, seed, args)
            res[key] = score(export, args)
            if key != "teacher":
                res[key]["train_seconds"] = json.loads((d / key / "summary.json").read_text()).get("train_seconds")
            path.write_text(json.dumps(res, indent=1))
    if "throughput" not in res:
        res["throughput"] = measure(teacher, d / args.variant_list[0] / "export", args)
        res["teacher_shape"] = json.loads((teacher / "config.json").read_text())["shape"]
        path.write_text(json.dumps(res, indent=1))
    return res


def table(results: list[dict], args) -> str:
    def ms(vals, scale=100.0):
        vals = [scale * v for v in vals]
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"
    t = results[0]["teacher_shape"]
    rows = [("teacher", f"fusion teacher ({t['width']} wide, {t['depth']} blocks)")] + \
        [(k, VARIANTS[k][0]) for k in args.variant_list]
    tp = [r["throughput"] for r in results]
    t_cps = statistics.mean(x["teacher_cps"] for x in tp)
    ratio = statistics.mean(x["student_cps"] / x["teacher_cps"] for x in tp)
    s = settings(args)
    lines = [f"Held-out captions ({results[0]['teacher']['n']} images, 5 references each), metrics x 100, mean ± std "
             f"over {len(results)} seed(s); decoding: beam {s.beam_size}, max {s.max_length} tokens, cached; "
             f"students {args.width} wide, {args.depth} blocks, {args.heads} heads, {args.student_steps} steps each",
             "", "| model | params | captions/s | vs teacher | CIDEr-D | BLEU-4 | METEOR | ROUGE-L |",
             "|---|---|---|---|---|---|---|---|"]
    for key, label in rows:
        params = tp[0]["teacher_params" if key == "teacher" else "student_params"]
        cps, rel = (t_cps, 1.0) if key == "teacher" else (t_cps * ratio, ratio)
        cells = [f"{params / 1e3:.0f}K", f"{cps:.0f}", f"{rel:.2f}x"] + [ms([r[key][m] for r in results])
                                                                         for m in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    uncached = statistics.mean(x["teacher_uncached_cps"] / x["teacher_cps"] for x in tp)
    base = {r["seed"]: r["no_distill"]["cider"] for r in results}
    lines += ["", "CIDEr-D per seed (x 100): " + "; ".join(
        f"seed {r['seed']}: " + " / ".join(f"{100 * r[k]['cider']:.1f}" for k, _ in rows) for r in results)
        + " (" + " / ".join(k for k, _ in rows) + ")",
        "Distilled student ahead of no distillation on CIDEr-D: " + ", ".join(
            f"{k} {sum(r[k]['cider'] > base[r['seed']] for r in results)}/{len(results)} seeds"
            for k in args.variant_list if k != "no_distill"),
        f"Teacher decoding without the cache: {uncached:.2f}x the captions/s of the cached decoder."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", default="runs/caption")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train-samples", type=int, default=20_000)
    ap.add_argument("--val-samples", type=int, default=1_000)
    ap.add_argument("--teacher-steps", type=int, default=2000)
    ap.add_argument("--student-steps", type=int, default=1000)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--queue", type=int, default=1024,
                    help="loss.nce_queue_size of the token-NCE students (a demo batch brings over 2,000 teacher "
                         "tokens a step, so even 4,096 holds under two steps; 1,024 costs a quarter as much)")
    ap.add_argument("--beam", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=22)
    ap.add_argument("--length-penalty", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5, help="timing rounds of the throughput measurement")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--md", default=None, help="also write the table here")
    ap.add_argument("--paper-shapes", action="store_true",
                    help="only time decoding at compress_caption's shapes (random weights) and print that table")
    ap.add_argument("--paper-batch", type=int, default=4, help="images per batch of --paper-shapes")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args(argv)
    args.variant_list = [v for v in VARIANTS if v in args.variants.split(",")]
    if set(args.variants.split(",")) - set(VARIANTS) or "no_distill" not in args.variant_list:
        ap.error(f"--variants: a subset of {list(VARIANTS)} that includes no_distill")
    import torch

    from dide_scale.metrics import setup_logging
    setup_logging(0)
    if args.paper_shapes:
        print(paper_shapes(args))
        return 0
    args.out = Path(args.out)
    args.data = args.out / "data"
    t0 = time.time()
    make_data(args.data, args.train_samples, args.val_samples)
    results = [run_seed(int(s), args) for s in args.seeds.split(",")]
    md = table(results, args)
    md += (f"\n\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
           f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}; throughput at batch 256, fp32; "
           f"this invocation {time.time() - t0:.0f} s (runs and scores already on disk were reused, not re-timed).")
    print("\n" + md)
    if args.md:
        Path(args.md).write_text(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
