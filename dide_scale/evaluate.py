"""Evaluation: VQA score, NLVR2 / SNLI-VE / ITM accuracy, accuracy per question type,
retrieval recall@k, and the VQA answer JSON of the official evaluation server.

``dide-eval --model DIR --shards PATTERN --task vqa`` evaluates an exported model (student
or fusion) without DeepSpeed.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch
from tqdm import tqdm

from .task import batch_to_device


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
    (``pipeline.eval_share``): the ranks run their forward passes in lock-step (a rank out of
    data repeats its last batch, uncounted, so ZeRO-3's collective parameter gathers match)
    and the sums are added over ranks, so every rank returns what one process reading the
    whole split would.  ``max_batches`` caps each rank's batches."""
    from .distributed import any_rank, world_size
    was_training = model.training
    model.eval()
    if task == "itm":
        raise ValueError("ITM has no fixed labels to evaluate; use retrieval recall")
    score_sum = 0.0
    n = 0
    per_type: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    predictions = []
    lockstep = world_size() > 1
    it = iter(tqdm(loader, desc="eval", disable=not progress, leave=False))
    last, i = None, 0
    while True:
        batch = None if max_batches and i >= max_batches else next(it, None)
        have = batch is not None
        if not (any_rank(have, group) if lockstep else have):
            break
        i += 1
        last = batch if have else last
        if last is None:
            raise RuntimeError("a rank has no evaluation batch while others have: give the split at least as "
                               "many shards as ranks")
        b = batch_to_device(last, device, dtype)
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
    from .distributed import gather_objects
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


@torch.no_grad()
def evaluate_retrieval(model, loader, scorer: str = "itm", device="cpu", dtype=torch.float32,
                       max_batches: int = 0, prepare: bool = True) -> dict:
    """Image-text retrieval over a split of (image, caption) shards with a dual encoder.

    Each image (by ``image_id``, else the sample key) and each caption is encoded once; the
    score matrix is the ITM head over every (text, image) pair from the cached [CLS] vectors
    (``scorer='itm'``) or the cosine of the contrastive embeddings (``'itc'``, N + M work).
    ``prepare=False`` leaves the model's device and dtype alone (a model inside an engine)."""
    from .inference import DualEncoderInference
    from .models.images import from_batch
    if not hasattr(model, "encode_image"):
        raise ValueError("retrieval evaluation needs a dual encoder (a fusion model would need one joint pass "
                         "per image-text pair)")
    if scorer not in ("itm", "itc"):
        raise ValueError(f"scorer={scorer!r} must be 'itm' or 'itc'")
    inf = DualEncoderInference(model, device, dtype, prepare=prepare)
    texts, images, text_image, index = [], [], [], {}
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        ids = batch.get("image_ids", batch["keys"])
        new = []  # first occurrence of each image (one batch often holds several captions of it)
        for j, iid in enumerate(ids):
            if iid not in index:
                index[iid] = len(index)
                new.append(j)
        if new:
            images.append(inf.encode_images(from_batch(batch)[new]))
        texts.append(inf.encode_texts(batch["input_ids"], batch["attention_mask"]))
        text_image += [index[iid] for iid in ids]
    t, im = torch.cat(texts), torch.cat(images)
    if scorer == "itc":
        te, ie = model.contrastive_embeddings(t, im)
        sim = te @ ie.t()
    else:
        sim = inf.pair_scores(t, im)
    res = retrieval_recall(sim, torch.tensor(text_image))
    return {**res, "n_texts": t.shape[0], "n_images": im.shape[0], "scorer": scorer}


@torch.no_grad()
def itm_pair_accuracy(model, loader, device="cpu") -> dict:
    """Image-text matching accuracy on held-out pairs, for a fusion model or a dual encoder with
    an ITM head: each (caption, image) pair of the split is a positive, and the caption with the
    next sample's image in its batch (wrapping round) a negative.  Returns {'accuracy', 'n',
    'per_type': {'match', 'mismatch'}}; a fixed, cheap measure (retrieval recall would need a
    joint pass per image-text pair of a fusion model)."""
    from .inference import DualEncoderInference
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

    from .export import read_geometry
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
    return base


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError, load_config
    from .data.pipeline import answer_list, build_loader
    from .models.saved import load_pretrained
    ap = argparse.ArgumentParser(prog="dide-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="exported model folder (what dide_scale.export writes); its "
                                                   "tokenizer, image geometry and answer names are used")
    ap.add_argument("--config", default=None, help="a config whose settings override the folder's (optional)")
    ap.add_argument("--shards", required=True, help="evaluation shard pattern")
    ap.add_argument("--vqa-json", default=None, help="write VQA answers here (server format)")
    ap.add_argument("--retrieval", choices=("itm", "itc"), default=None,
                    help="image-text retrieval recall@1/5/10 on caption shards, scored by the ITM head over all "
                         "pairs or by contrastive embeddings (the default for an ITM model: itm)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    try:
        model = load_pretrained(args.model)
        retrieval = args.retrieval or ("itm" if model.task == "itm" else None)
        cfg = load_config(args.config, [*args.overrides, f"train.task={'itm' if retrieval else model.task}",
                                        f"data.val_shards={args.shards}", "loss.attn_t2i=0", "loss.attn_i2t=0",
                                        "loss.soft_label=0", "loss.ground_truth=1"],
                          base=export_settings(args.model, model))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"dide-eval: error: {e}", file=sys.stderr)
        return 2
    loader = build_loader(cfg, "val")
    if retrieval:
        json.dump(evaluate_retrieval(model, loader, retrieval), sys.stdout, indent=2)
        print()
        return 0
    answers = answer_list(cfg) if model.task == "vqa" else None
    res = evaluate(model, loader, model.task, torch.device("cpu"), answers=answers, progress=True)
    if args.vqa_json and "predictions" in res:
        write_vqa_submission(res["predictions"], args.vqa_json)
    res.pop("predictions", None)
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
