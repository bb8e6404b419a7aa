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
    out = model(b["pixels"], b["input_ids"], b["attention_mask"], b.get("pixels2"))
    return out.logits


@torch.no_grad()
def evaluate(model, loader, task: str, device, dtype=torch.float32, max_batches: int = 0,
             answers: list[str] | None = None, progress: bool = False) -> dict:
    """Runs ``model`` over ``loader`` once. Returns {'accuracy', 'n', 'per_type': {...}} and,
    for VQA, 'predictions' [{'question_id', 'answer'}] when ``answers`` is given."""
    was_training = model.training
    model.eval()
    if task == "itm":
        raise ValueError("ITM has no fixed labels to evaluate; use retrieval recall")
    score_sum = 0.0
    n = 0
    per_type: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    predictions = []
    it = tqdm(loader, desc="eval", disable=not progress, leave=False)
    for i, batch in enumerate(it):
        if max_batches and i >= max_batches:
            break
        b = batch_to_device(batch, device, dtype)
        logits = model_logits(model, b).float()
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
    out = {"accuracy": score_sum / max(1, n), "n": n,
           "per_type": {k: v[0] / v[1] for k, v in sorted(per_type.items())}}
    if predictions:
        out["predictions"] = predictions
    return out


@torch.no_grad()
def retrieval_recall(text_emb: torch.Tensor, image_emb: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k for text->image and image->text with pair i <-> i as the positive."""
    sim = text_emb.float() @ image_emb.float().t()
    target = torch.arange(sim.shape[0], device=sim.device)
    out = {}
    for name, s in (("t2i", sim), ("i2t", sim.t())):
        ranks = (s > s.gather(1, target[:, None])).sum(1)  # how many beat the positive
        for k in ks:
            out[f"{name}_r@{k}"] = (ranks < k).float().mean().item()
    return out


def write_vqa_submission(predictions: list[dict], path: str) -> None:
    """The official VQA server format: a JSON list of {"question_id": int, "answer": str}."""
    rows = []
    for p in predictions:
        qid = p["question_id"]
        rows.append({"question_id": int(qid) if str(qid).isdigit() else qid, "answer": p["answer"]})
    with open(path, "w") as f:
        json.dump(rows, f)


def main(argv: list[str] | None = None) -> int:
    from .config import load_config
    from .data.pipeline import answer_list, build_loader
    from .models.build import load_pretrained
    ap = argparse.ArgumentParser(prog="dide-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="exported model directory (config.json + model.safetensors)")
    ap.add_argument("--config", default=None, help="run config (data/tokenizer settings); default: built-in")
    ap.add_argument("--shards", required=True, help="evaluation shard pattern")
    ap.add_argument("--vqa-json", default=None, help="write VQA answers here (server format)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    model = load_pretrained(args.model)
    cfg = load_config(args.config, [*args.overrides, f"train.task={model.task}", f"data.val_shards={args.shards}",
                                    "loss.attn_t2i=0", "loss.attn_i2t=0", "loss.soft_label=0",
                                    "loss.ground_truth=1"])
    loader = build_loader(cfg, "val")
    answers = answer_list(cfg) if model.task == "vqa" else None
    res = evaluate(model, loader, model.task, torch.device("cpu"), answers=answers, progress=True)
    if args.vqa_json and "predictions" in res:
        write_vqa_submission(res["predictions"], args.vqa_json)
    res.pop("predictions", None)
    json.dump(res, sys.stdout, indent=2)
    print()
    return 0
