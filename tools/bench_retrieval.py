#!/usr/bin/env python
"""Retrieval the way a dual encoder is deployed, against its fusion teacher.

``speed``: N images x M captions (five per image), random weights (speed does not depend on
them), at the demo's or B/32 shapes.  The student embeds every image and caption once, then
ranks both ways with the protocol of ``dide-eval --retrieval``: contrastive similarity over
all pairs (``itc``), its top K re-scored by the ITM head (``rerank``), or the ITM head over
every pair (``itm``).  The fusion teacher needs one joint forward per pair: it is timed on a
sample of pairs (in three slices, before, between and after the student's stages, so load
drift hits both) and scaled to N x M, as the table says.

``recall``: held-out retrieval recall on the demo's scenes and captions (one caption per
scene, 2,000 of them), of a dual-encoder student pre-trained on ITM + ITC with distillation
from the demo's ITM fusion teacher (``dide-pretrain``, as ``tools/bench_stages.py``'s
``pre_kd``), with no fine-tuning: the zero-shot figures the pre-training run's own last
evaluation printed, then every scorer on the same embeddings, and the teacher scoring every
pair of a subset beside the student on the same subset.

    OMP_NUM_THREADS=1 python tools/bench_retrieval.py speed --preset demo --images 1000 --texts 5000
    OMP_NUM_THREADS=1 python tools/bench_retrieval.py speed --preset b32 --images 1000 --texts 5000 --batch 32 \
        --teacher-pairs 48 --teacher-batch 16
    OMP_NUM_THREADS=1 python tools/bench_retrieval.py recall --out runs/retrieval

Times are this process's CPU seconds (and wall seconds): with one thread, the CPU time is the
work done, which other jobs on a shared machine do not inflate as they do the wall time.
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

import torch

from dide_scale.bench import IMAGES, PRESETS, synthetic_images


def machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def clock(fn, repeats: int = 1) -> tuple[dict, object]:
    """{'cpu_s', 'wall_s'}: the median over ``repeats`` calls of ``fn`` of this process's CPU
    seconds and of wall seconds; and the last result.  On a shared machine the CPU time of a
    one-thread run is the measure of work that other jobs do not inflate."""
    cpu, wall, out = [], [], None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall)}, out


# -- speed ---------------------------------------------------------------------------------

def text_batch(arch: dict, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, arch["vocab_size"], (n, arch["max_text_len"]), generator=g)
    mask = torch.ones_like(ids)
    mask[:, arch["max_text_len"] * 3 // 4:] = 0  # some padding, as real captions have
    return ids, mask


def teacher_pair_seconds(teacher, pool, ids, mask, pairs: int, batch: int) -> dict:
    """{'cpu_s', 'wall_s'} per (image, caption) joint forward of the teacher, over ``pairs``
    pairs in batches of ``batch`` distinct (image, caption) rows."""
    @torch.inference_mode()
    def run():
        for s in range(0, pairs, batch):
            b = min(batch, pairs - s)
            teacher(pool[torch.arange(s, s + b) % len(pool)], ids[:b], mask[:b])
    secs, _ = clock(run)
    return {k: v / pairs for k, v in secs.items()}


def speed(args) -> dict:
    from dide_scale.inference import DualEncoderInference
    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.student import DualEncoder, TowerShape
    from dide_scale.retrieval import Embedded, rank_queries
    arch = PRESETS[args.preset]
    shape = TowerShape(**arch)
    torch.manual_seed(0)
    student, teacher = DualEncoder(shape, "itm", 2).eval(), FusionEncoder(shape, "itm", 2).eval()
    inf = DualEncoderInference(student)
    g = torch.Generator().manual_seed(0)
    n, m, bs = args.images, args.texts, args.batch
    # a pool of distinct images cycled through (the work per image does not depend on its pixels)
    pool = inf._images(synthetic_images(args.preset, min(n, 4 * bs), g))
    ids, mask = text_batch(arch, m, g)
    t_ids, t_mask = text_batch(arch, args.teacher_batch, g)
    per_pair = [teacher_pair_seconds(teacher, pool, t_ids, t_mask, args.teacher_pairs // 3, args.teacher_batch)]

    def embed_images():
        return torch.cat([inf.encode_images(pool[torch.arange(s, min(s + bs, n)) % len(pool)])
                          for s in range(0, n, bs)])

    def embed_texts():
        return torch.cat([inf.encode_texts(ids[s:s + bs], mask[s:s + bs]) for s in range(0, m, bs)])
    res = {"images": n, "texts": m, "k": args.k, "preset": args.preset}
    res["embed_images"], im = clock(embed_images)
    res["embed_texts"], t = clock(embed_texts)
    with torch.inference_mode():
        t_itc, i_itc = student.contrastive_embeddings(t, im)
    per = m // n
    emb = Embedded(t, t_itc, im, i_itc, [f"{j:07d}" for j in range(m)],
                   [f"{min(j // per, n - 1):07d}" for j in range(m)], [f"{i:07d}" for i in range(n)])
    per_pair.append(teacher_pair_seconds(teacher, pool, t_ids, t_mask, args.teacher_pairs // 3, args.teacher_batch))
    for scorer in ("itc", "rerank", "itm"):
        if scorer == "itm" and args.skip_student_itm:
            continue
        res[f"rank_{scorer}"], _ = clock(lambda s=scorer: rank_queries(inf, emb, s, args.k))
    per_pair.append(teacher_pair_seconds(teacher, pool, t_ids, t_mask, args.teacher_pairs // 3, args.teacher_batch))
    res["teacher_per_pair_slices"] = per_pair
    res["teacher_pairs_timed"] = 3 * (args.teacher_pairs // 3)
    res["teacher_all_pairs"] = {k: statistics.median(p[k] for p in per_pair) * n * m for k in ("cpu_s", "wall_s")}
    for scorer in ("itc", "rerank", "itm"):
        if f"rank_{scorer}" in res:
            res[f"student_{scorer}"] = {k: res["embed_images"][k] + res["embed_texts"][k] + res[f"rank_{scorer}"][k]
                                        for k in ("cpu_s", "wall_s")}
    res.update(machine=machine(), torch=torch.__version__, when=time.strftime("%Y-%m-%d %H:%M"))
    return res


def fmt(seconds: float) -> str:
    return f"{seconds:,.2f}" if seconds < 100 else f"{seconds:,.0f}"


def speed_table(r: dict) -> str:
    n, m, k = r["images"], r["texts"], r["k"]
    h, w = IMAGES[r["preset"]][0]
    lines = [f"{r['preset']}: {n:,} images ({h}x{w}) x {m:,} captions ({m * n:,} pairs), K = {k}, fp32 on "
             f"{r['machine']}; CPU seconds of this process (wall seconds in brackets)", "",
             "| the student's rerank pipeline | CPU s (wall s) | share |", "|---|---:|---:|"]
    total = r["student_rerank"]["cpu_s"]
    rows = [("embed every image", r["embed_images"]), ("embed every caption", r["embed_texts"]),
            (f"contrastive similarity of all pairs, top {k} both ways, ITM head on those", r["rank_rerank"])]
    lines += [f"| {label} | {fmt(x['cpu_s'])} ({fmt(x['wall_s'])}) | {100 * x['cpu_s'] / total:.0f}% |"
              for label, x in rows]
    teacher = r["teacher_all_pairs"]
    lines += ["", "| ranking every caption and every image | CPU s (wall s) | teacher / this (CPU) |",
              "|---|---:|---:|"]
    rows = [("student, contrastive only (itc)", r["student_itc"]),
            (f"student, contrastive top {k} re-ranked by the ITM head (rerank)", r["student_rerank"])]
    if "student_itm" in r:
        rows.append(("student, ITM head on every pair (itm)", r["student_itm"]))
    lines += [f"| {label} | {fmt(x['cpu_s'])} ({fmt(x['wall_s'])}) | {teacher['cpu_s'] / x['cpu_s']:,.0f}x |"
              for label, x in rows]
    lines.append(f"| fusion teacher, one joint forward per pair (**{r['teacher_pairs_timed']:,} pairs timed, scaled "
                 f"to {n * m:,}**) | {fmt(teacher['cpu_s'])} ({fmt(teacher['wall_s'])}) | 1x |")
    slices = ", ".join(f"{1e3 * s['cpu_s']:.2f}" for s in r["teacher_per_pair_slices"])
    lines += ["", f"Teacher CPU ms per pair in the three slices (before, between, after the student's stages): "
                  f"{slices}; the median is scaled."]
    return "\n".join(lines)


# -- recall --------------------------------------------------------------------------------

def train_models(args, data: Path) -> tuple[Path, Path]:
    """The demo's ITM fusion teacher (shipped, given, or trained with the demo's recipe) and a
    dual encoder pre-trained on ITM + ITC distilling it, evaluated on the held-out split."""
    from dide_scale import demo
    val = data / "vqa" / "val"
    teacher = Path(args.teacher_itm) if args.teacher_itm else None
    if teacher is None:
        try:
            teacher = demo.shipped_teachers()[0]
        except FileNotFoundError:
            fusion = ["student.kind=fusion", "loss.ground_truth=1.0", *demo.NO_DISTIL]
            teacher = demo.train_run("teacher_itm", args.out / "teacher_itm", [*demo.shard_overrides(data, "itm"),
                                                                               *fusion], demo.TEACHER_ITM_STEPS, 0,
                                     args.config, args.overrides) / "export"
    student = demo.train_run("student_itm", args.out / "student_itm", [
        *demo.shard_overrides(data, "itm"), f"data.val_shards={val}/{{00000..{demo.last_shard(val)}}}.tar",
        *demo.DISTIL, "loss.ground_truth=1.0", "loss.itc=1.0", f"teacher.path={teacher}",
        "train.eval_retrieval=rerank", f"train.eval_retrieval_k={args.zero_shot_k}"], args.pretrain_steps, args.seed,
        args.config, args.overrides)
    return teacher, student


def held_out(student_dir: Path, data: Path, batch_size: int = 256):
    """The held-out split's loader, configured as the exported student says."""
    from dide_scale import demo
    from dide_scale.config import load_config
    from dide_scale.data.pipeline import build_loader
    from dide_scale.evaluate import export_settings
    from dide_scale.models.saved import load_pretrained
    model = load_pretrained(student_dir)
    val = data / "vqa" / "val"
    cfg = load_config(None, ["data.num_workers=0", "train.task=itm", "loss.ground_truth=1", *demo.NO_DISTIL,
                             f"data.val_shards={val}/{{00000..{demo.last_shard(val)}}}.tar"],
                      base=export_settings(str(student_dir), model))
    return model, build_loader(cfg, "val", batch_size=batch_size)


@torch.inference_mode()
def teacher_ranks(teacher, loader, n: int, batch: int = 512):
    """Ranks of the fusion teacher scoring every pair of the split's first ``n`` scenes and their
    captions (one caption per demo scene), by the ITM logit margin, as the student's ``itm``;
    and the scenes' ids."""
    from dide_scale.models.images import Images, from_batch
    from dide_scale.retrieval import Ranks, rank_of_positive
    ims, ids, masks, image_ids = [], [], [], []
    for b in loader:
        ims.append(from_batch(b))
        ids.append(b["input_ids"])
        masks.append(b["attention_mask"])
        image_ids += b["image_ids"]
        if len(image_ids) >= n:
            break
    if len(set(image_ids[:n])) != n:
        raise ValueError("teacher_ranks expects one caption per scene (the demo's split)")
    images = Images.cat(ims)[:n]
    images = Images(images.patches.float().div(255), images.coord, images.valid)
    ids, masks = torch.cat(ids)[:n], torch.cat(masks)[:n]
    scores = torch.empty(n, n)  # [text, image]
    ti, ii = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    for s in range(0, n * n, batch):
        t, i = ti[s:s + batch], ii[s:s + batch]
        logits = teacher(images[i], ids[t], masks[t]).logits.float()
        scores.view(-1)[s:s + batch] = logits[:, 1] - logits[:, 0]
    eye = torch.eye(n, dtype=torch.bool)
    ranks = Ranks(rank_of_positive(scores, eye), rank_of_positive(scores.t(), eye), {"t2i": n, "i2t": n})
    return ranks, image_ids[:n]


def subset(emb, image_ids: list[str]):
    """The embeddings of these images and their captions."""
    from dide_scale.retrieval import Embedded
    keep = set(image_ids)
    im = [i for i, iid in enumerate(emb.image_ids) if iid in keep]
    rows = [j for j, iid in enumerate(emb.text_image_ids) if iid in keep]
    return Embedded(emb.text[rows], emb.text_itc[rows], emb.image[im], emb.image_itc[im],
                    [emb.text_keys[j] for j in rows], [emb.text_image_ids[j] for j in rows],
                    [emb.image_ids[i] for i in im])


def caption_ceiling(split_dir: Path) -> dict:
    """How far a split of one caption per scene can be retrieved: the captions that are word for
    word another scene's too, and the expected text-to-image R@1 of a ranker that reads every
    caption perfectly but must pick at random among the scenes sharing it (1 / their number)."""
    import collections
    import tarfile
    captions = []
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tf:
            captions += [tf.extractfile(m).read().decode().strip() for m in tf.getmembers() if m.name.endswith(".txt")]
    count = collections.Counter(captions)
    return {"captions": len(captions), "shared": sum(1 for c in captions if count[c] > 1),
            "t2i_r@1": sum(1 / count[c] for c in captions) / max(1, len(captions))}


def recall(args) -> dict:
    from dide_scale import demo
    from dide_scale.inference import DualEncoderInference
    from dide_scale.metrics import setup_logging
    from dide_scale.models.saved import load_pretrained
    from dide_scale.retrieval import embed_share, rank_queries
    setup_logging(0)
    args.out = Path(args.out)
    data = args.out / "data"
    demo.make_data(data, args.train_samples, args.val_samples)
    teacher_dir, student_run = train_models(args, data)
    summary = json.loads((student_run / "summary.json").read_text())
    model, loader = held_out(student_run / "export", data)
    inf = DualEncoderInference(model)
    embed, emb = clock(lambda: embed_share(inf, loader))
    res = {"zero_shot_eval": summary["eval"], "teacher": str(teacher_dir), "student": str(student_run),
           "pretrain_steps": args.pretrain_steps, "n_images": len(emb.image_ids), "n_texts": len(emb.text_keys),
           "embed": embed, "rows": []}
    for scorer, k in [("itc", 0), *[("rerank", k) for k in args.ks], ("itm", 0)]:
        secs, ranks = clock(lambda s=scorer, k=k: rank_queries(inf, emb, s, k or 1), args.repeats)
        res["rows"].append({"scorer": scorer, "k": k, **secs, **ranks.recall()})
    if args.teacher_subset:
        n = args.teacher_subset
        teacher = load_pretrained(teacher_dir).eval()
        _, sub_loader = held_out(student_run / "export", data)
        secs, (ranks, ids) = clock(lambda: teacher_ranks(teacher, sub_loader, n))
        res["subset"] = {"n": n, "teacher": {**secs, **ranks.recall()}}
        sub = subset(emb, ids)
        for scorer, k in [("itc", 0), ("rerank", max(args.ks)), ("itm", 0)]:
            s_secs, s_ranks = clock(lambda s=scorer, k=k: rank_queries(inf, sub, s, k or 1), args.repeats)
            res["subset"][f"{scorer}{k or ''}"] = {**s_secs, **s_ranks.recall()}
    res["pair_accuracy"] = {name: demo.evaluate_export(d, data, "itm")["accuracy"]
                            for name, d in (("teacher", teacher_dir), ("student", student_run / "export"))}
    res["ceiling"] = caption_ceiling(data / "vqa" / "val")
    res.update(machine=machine(), torch=torch.__version__, when=time.strftime("%Y-%m-%d %H:%M"))
    return res


def recall_table(r: dict) -> str:
    def cells(x):
        return " | ".join(f"{100 * x[f'{d}_r@{k}']:.1f}" for d in ("t2i", "i2t") for k in (1, 5, 10))
    head = "| t2i R@1 | R@5 | R@10 | i2t R@1 | R@5 | R@10 |"
    z = r["zero_shot_eval"]
    lines = [f"Held-out demo split: {r['n_images']:,} scenes, {r['n_texts']:,} captions; student pre-trained "
             f"{r['pretrain_steps']} steps (ITM + ITC, distilling the ITM fusion teacher), not fine-tuned; "
             f"{r['machine']}", "",
             f"| scorer | candidates per query | {head[2:]} ranking CPU s |", "|---|---:|" + "---:|" * 7,
             f"| zero-shot: the pre-training run's last evaluation (rerank) | {z['k']} | {cells(z)} | - |"]
    for row in r["rows"]:
        cand = {"itc": "all", "itm": "all"}.get(row["scorer"], str(row["k"]))
        name = {"itc": "contrastive only (itc)", "itm": "ITM head on every pair (itm)"}.get(
            row["scorer"], f"contrastive top {row['k']}, ITM re-rank (rerank)")
        lines.append(f"| {name} | {cand} | {cells(row)} | {row['cpu_s']:.2f} |")
    lines += ["", f"Embedding the split (read, decode, both towers): {r['embed']['cpu_s']:.1f} CPU s."]
    if "subset" in r:
        s = r["subset"]
        lines += ["", f"The first {s['n']} scenes and their captions ({s['n'] ** 2:,} pairs):", "",
                  f"| model | {head[2:]} CPU s |", "|---|" + "---:|" * 7]
        for key, row in s.items():
            if key == "n":
                continue
            label = "fusion teacher, joint forward on every pair" if key == "teacher" else f"student, {key}"
            lines.append(f"| {label} | {cells(row)} | {row['cpu_s']:.2f} |")
    if "pair_accuracy" in r:
        a, c = r["pair_accuracy"], r["ceiling"]
        lines += ["", f"ITM pair accuracy on the held-out split (each caption with its own scene and with the next "
                      f"sample's; `demo.evaluate_export(..., 'itm')`): teacher {100 * a['teacher']:.1f}%, student "
                      f"{100 * a['student']:.1f}%.",
                  f"Captions that are word for word another scene's too: {c['shared']:,} of {c['captions']:,}; "
                  f"expected t2i R@1 of a ranker that reads every caption perfectly and picks at random among the "
                  f"scenes sharing it: {100 * c['t2i_r@1']:.1f}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed", help="student pipeline vs teacher on every pair, random weights")
    s.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    s.add_argument("--images", type=int, default=1000)
    s.add_argument("--texts", type=int, default=5000)
    s.add_argument("--k", type=int, default=128)
    s.add_argument("--batch", type=int, default=64, help="images or captions per tower pass")
    s.add_argument("--teacher-pairs", type=int, default=3000, help="pairs the teacher is timed on (3 slices)")
    s.add_argument("--teacher-batch", type=int, default=64, help="pairs per joint forward")
    s.add_argument("--skip-student-itm", action="store_true", help="leave out the student's exhaustive ITM row")
    r = sub.add_parser("recall", help="held-out recall of a pre-trained demo student (trains it: ~15 min on 2 cores)")
    r.add_argument("--out", default="runs/retrieval")
    r.add_argument("--teacher-itm", default=None, help="an exported ITM fusion teacher (default: the shipped one, "
                                                       "else trained here with the demo's recipe)")
    r.add_argument("--pretrain-steps", type=int, default=2400)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--ks", default="16,128", help="rerank K values to report")
    r.add_argument("--zero-shot-k", type=int, default=128, help="train.eval_retrieval_k of the pre-training run")
    r.add_argument("--teacher-subset", type=int, default=300, help="scenes the teacher scores every pair of (0: none)")
    r.add_argument("--repeats", type=int, default=3, help="timed runs of each scorer (median)")
    r.add_argument("--train-samples", type=int, default=20_000)
    r.add_argument("--val-samples", type=int, default=2_000)
    r.add_argument("--config", default="demo")
    r.add_argument("overrides", nargs="*", help="key=value overrides for the training runs")
    for p in (s, r):
        p.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.cmd == "speed":
        res = speed(args)
        md = speed_table(res)
    else:
        args.ks = [int(k) for k in args.ks.split(",")]
        res = recall(args)
        md = recall_table(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    print("\n" + md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
