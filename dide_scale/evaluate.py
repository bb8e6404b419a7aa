"""Evaluation: VQA score, NLVR2 / SNLI-VE / ITM accuracy, accuracy per question type,
retrieval recall@k, and the VQA answer JSON of the official evaluation server.

``dide-eval --model DIR --shards PATTERN --task vqa`` evaluates an exported model (student
or fusion) without DeepSpeed; a captioner is decoded and scored by ``dide_scale.captions``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch

from . import distributed
from .captions import eval_main
from .config import ConfigError, load_config
from .console import add_version, quiet_libraries
from .data.pipeline import build_loader
from .data.transforms import read_geometry
from .distributed import gather_objects, lockstep_batches, world_size
from .inference import DualEncoderInference
from .labels import answer_list
from .models.saved import load_pretrained
from .objective import batch_to_device
from .retrieval import SCORERS, retrieval_ranks


def model_logits(model, b: dict) -> torch.Tensor:
    """Logits of a DualEncoder or FusionEncoder/HF teacher for an evaluation batch."""
    out = model(b["images"], b["input_ids"], b["attention_mask"], b.get("images2"))
    return out.logits


@torch.no_grad()
def evaluate(model, loader, task: str, device, dtype=torch.float32, max_batches: int = 0,
             answers: list[str] | None = None, progress: bool = False, group=None) -> dict:
    """Runs ``model`` over ``loader`` once. Returns {'accuracy', 'n', 'per_type': {...}} and,
    for VQA, 'predictions' [{'question_id', 'answer'}] when ``answers`` is given.

    In a process group, each rank's ``loader`` reads its own share of the split
    (``pipeline.eval_split``): the ranks run their forward passes in lock-step (a rank out of
    data repeats its last batch, uncounted, so ZeRO-3's collective parameter gathers match)
    and the sums are added over ranks, so every rank returns what one process reading the
    whole split would.  ``max_batches`` caps each rank's batches."""
    was_training = model.training
    model.eval()
    if task == "itm":
        raise ValueError("ITM has no fixed labels to evaluate; use retrieval recall")
    score_sum = 0.0
    n = 0
    per_type: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    predictions = []
    lockstep = world_size() > 1
    for batch, have in lockstep_batches(loader, max_batches, lockstep, group, progress):
        b = batch_to_device(batch, device, dtype)
        logits = model_logits(model, b).float()
        if not have:
            continue
        pred = logits.argmax(-1)
        if task == "vqa":  # VQA score: the soft score of the predicted answer
            scores = b["labels"].gather(1, pred[:, None]).squeeze(1)
            if answers is not None:
                predictions += [{"question_id": q, "answer": answers[p]}
                                for q, p in zip(batch.get("question_id", batch["keys"]), pred.tolist())]
        else:
            scores = (pred == b["labels"]).float()
        scores = scores.cpu().tolist()
        score_sum += sum(scores)
        n += len(scores)
        for qt, s in zip(batch["qtype"], scores):
            per_type[qt][0] += s
            per_type[qt][1] += 1
    model.train(was_training)
    if lockstep:
        score_sum, n, per_type = _sum_over_ranks(score_sum, n, per_type, group)
    out = {"accuracy": score_sum / max(1, n), "n": n,
           "per_type": {k: v[0] / v[1] for k, v in sorted(per_type.items())}}
    if predictions:
        out["predictions"] = predictions
    return out


def _sum_over_ranks(score_sum: float, n: int, per_type: dict, group=None):
    parts = gather_objects((score_sum, n, dict(per_type)), group)
    total, count, types = 0.0, 0, defaultdict(lambda: [0.0, 0])
    for s, c, pt in parts:
        total, count = total + s, count + c
        for k, (a, m) in pt.items():
            types[k][0] += a
            types[k][1] += m
    return total, count, types


@torch.no_grad()
def retrieval_recall(sim: torch.Tensor, text_image: torch.Tensor | None = None, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways from a [M texts, N images] score matrix.

    ``text_image[j]`` is the index of text j's image (default: j, one caption per image).
    t2i: a text is a hit when its image is in its top k.  i2t: an image is a hit when any
    of its captions is in its top k (the COCO/Flickr convention with 5 captions per image);
    images without a caption are not counted.  Ties do not count against the positive.
    """
    sim = sim.float()
    m, n = sim.shape
    target = torch.arange(m, device=sim.device) if text_image is None else text_image.to(sim.device)
    t2i_rank = (sim > sim.gather(1, target[:, None])).sum(1)  # images that beat the positive, per text
    own = sim[torch.arange(m, device=sim.device), target]  # score of each text with its image
    # an image's best-ranked caption is its highest-scoring one: rank that score among all texts
    best_own = torch.full((n,), float("-inf"), device=sim.device).scatter_reduce(0, target, own, "amax")
    best = (sim.t() > best_own[:, None]).sum(1)  # [N]; [N, M] work, never [M, M]
    has_text = torch.zeros(n, dtype=torch.bool, device=sim.device).index_fill_(0, target, True)
    out = {}
    for k in ks:
        out[f"t2i_r@{k}"] = (t2i_rank < k).float().mean().item()
    for k in ks:
        out[f"i2t_r@{k}"] = (best[has_text] < k).float().mean().item()
    return out


def evaluate_retrieval(model, loader, scorer: str = "itm", device="cpu", dtype=torch.float32,
                       max_batches: int = 0, prepare: bool = True, k: int = 128, group=None,
                       partitioned: bool = False) -> dict:
    """Image-text retrieval recall@1/5/10 over a split of (image, caption) shards with a dual
    encoder (``dide_scale.retrieval``): each image (by ``image_id``, else the sample key) and
    each caption encoded once, then ranked by ``scorer``: 'itm' (the ITM head over every
    pair), 'itc' (contrastive cosine) or 'rerank' (the contrastive top ``k`` of each query
    re-scored by the ITM head).  In a process group each rank's ``loader`` reads its own share
    of the split (``build_loader(..., exclusive=True)``) and every rank returns the figures of
    the whole split.  ``prepare=False`` leaves the model's device and dtype alone (a model
    inside an engine); ``partitioned``: its parameters are ZeRO-3 partitioned (see the module)."""
    ranks, emb = retrieval_ranks(model, loader, scorer, k, device, dtype, max_batches, prepare, group, partitioned)
    out = {**ranks.recall(), "n_texts": len(emb.text_keys), "n_images": len(emb.image_ids), "scorer": scorer}
    if scorer == "rerank":
        out.update(k=k, candidates=ranks.candidates)
    return out


@torch.no_grad()
def itm_pair_accuracy(model, loader, device="cpu") -> dict:
    """Image-text matching accuracy on held-out pairs, for a fusion model or a dual encoder with
    an ITM head: each (caption, image) pair of the split is a positive, and the caption with the
    next sample's image in its batch (wrapping round) a negative.  Returns {'accuracy', 'n',
    'per_type': {'match', 'mismatch'}}; a fixed, cheap measure (retrieval recall would need a
    joint pass per image-text pair of a fusion model)."""
    model = model.eval().to(device)
    dual = hasattr(model, "encode_image")
    inf = DualEncoderInference(model, device) if dual else None
    hits = {"match": [0, 0], "mismatch": [0, 0]}
    for batch in loader:
        b = batch_to_device(batch, torch.device(device), torch.float32)
        images, ids, mask = b["images"], b["input_ids"], b["attention_mask"]
        shifted = images[torch.roll(torch.arange(len(images)), -1)]
        for kind, imgs in (("match", images), ("mismatch", shifted)):
            if dual:
                logits = inf.predict(inf.encode_texts(ids, mask), inf.encode_images(imgs))
            else:
                logits = model(imgs, ids, mask).logits
            pred = logits.float().argmax(-1)
            hits[kind][0] += int((pred == (kind == "match")).sum())
            hits[kind][1] += len(pred)
    n = sum(c for _, c in hits.values())
    return {"accuracy": sum(h for h, _ in hits.values()) / max(1, n), "n": n,
            "per_type": {k: h / max(1, c) for k, (h, c) in hits.items()}}


def write_vqa_submission(predictions: list[dict], path: str) -> None:
    """The official VQA server format: a JSON list of {"question_id": int, "answer": str}."""
    rows = []
    for p in predictions:
        qid = p["question_id"]
        rows.append({"question_id": int(qid) if str(qid).isdigit() else qid, "answer": p["answer"]})
    with open(path, "w") as f:
        json.dump(rows, f)


def export_settings(model_dir: str, model) -> dict:
    """What an exported folder says of itself, as config layers: the towers, the tokenizer,
    the image geometry, the answer names and the task."""
    import dataclasses
    import os

    base = {"student": {"kind": "dual" if hasattr(model, "encode_image") else "fusion",
                        "arch": dataclasses.asdict(model.shape)},
            "train": {"task": model.task}, "data": {}}
    if os.path.exists(os.path.join(model_dir, "tokenizer_config.json")) or \
            os.path.exists(os.path.join(model_dir, "vocab.txt")):
        base["data"]["tokenizer"] = str(model_dir)
    try:
        g = read_geometry(model_dir)
        base["data"].update(image_resize=g.resize, image_shorter=g.shorter, image_longer=g.longer)
    except FileNotFoundError:
        pass
    if model.task == "vqa":
        base["data"].update(answer_vocab=str(model_dir), num_answers=model.num_classes)
    if getattr(model, "generation", None) is not None:  # a captioner's decoding defaults
        base["caption"] = dataclasses.asdict(model.generation)
    return base


def shard_loader(cfg, rank: int = 0, world_size: int = 1, exclusive: bool = False):
    """The evaluation loader over --shards; a folder, a glob or a missing shard is refused in
    one line naming the option."""
    try:
        return build_loader(cfg, "val", rank, world_size, exclusive=exclusive)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"--shards: {e}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dide-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="exported model folder (what dide_scale.export writes); its "
                                                   "tokenizer, image geometry and answer names are used")
    ap.add_argument("--config", default=None,
                    help="a config (YAML file or shipped name) whose settings override the folder's (optional)")
    ap.add_argument("--shards", required=True,
                    help="evaluation shards: a file or a brace pattern, e.g. 'data/val/{00000..00003}.tar'")
    ap.add_argument("--vqa-json", default=None, help="write VQA answers here (server format)")
    ap.add_argument("--retrieval", choices=SCORERS, default=None,
                    help="image-text retrieval recall@1/5/10 on caption shards: 'rerank' (the contrastive top --k "
                         "of each query re-scored by the ITM head; the default for an ITM model), 'itc' "
                         "(contrastive embeddings only) or 'itm' (the ITM head over every pair)")
    ap.add_argument("--k", type=int, default=128,
                    help="candidates per query for --retrieval rerank (default 128; at least the split's image and "
                         "caption counts: every pair, ranked exactly as itm)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one); under torchrun "
                                                   "or srun every rank reads and embeds its own share of the split")
    ap.add_argument("--captions-json", default=None, help="a captioner: write the COCO results file "
                                                          "[{image_id, caption}] here")
    ap.add_argument("--beam", type=int, default=None, help="a captioner: beam size (default: the export's)")
    ap.add_argument("--max-length", type=int, default=None, help="a captioner: most tokens generated")
    ap.add_argument("--length-penalty", type=float, default=None, help="a captioner: length penalty")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    add_version(ap)
    args = ap.parse_args(argv)
    quiet_libraries()
    try:
        model = load_pretrained(args.model)
        retrieval = args.retrieval or ("rerank" if model.task == "itm" else None)
        if retrieval == "rerank" and args.k < 10:
            raise ValueError(f"--k {args.k}: recall@10 needs at least ten candidates per query")
        cfg = load_config(args.config, [*args.overrides, f"train.task={'itm' if retrieval else model.task}",
                                        f"data.val_shards={args.shards}", "loss.attn_t2i=0", "loss.attn_i2t=0",
                                        "loss.soft_label=0", "loss.ground_truth=1"],
                          base=export_settings(args.model, model))
        env = distributed.detect()
        loader = shard_loader(cfg, env.rank, env.world_size, exclusive=bool(retrieval))
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"dide-eval: error: {e}", file=sys.stderr)
        return 2
    device, control, made = distributed.init_evaluation_group(env, args.device)
    if model.task == "caption":
        code = eval_main(model, cfg, loader, args, device, control, env.is_main)
        if made:
            import torch.distributed as dist
            dist.destroy_process_group()
        return code
    if retrieval:
        res = evaluate_retrieval(model, loader, retrieval, device, k=args.k, group=control)
    else:
        answers = answer_list(cfg) if model.task == "vqa" else None
        res = evaluate(model.to(device), loader, model.task, device, answers=answers, progress=env.is_main,
                       group=control)
        predictions = [p for part in distributed.gather_objects(res.pop("predictions", []), control) for p in part]
        if args.vqa_json and predictions and env.is_main:
            write_vqa_submission(predictions, args.vqa_json)
    if env.is_main:
        json.dump(res, sys.stdout, indent=2)
        print()
    if made:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
