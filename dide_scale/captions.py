"""Caption evaluation the way the field scores it: decode every image of a split once, group
the references per image, and score with the standard COCO caption implementation
(pycocoevalcap: the PTB tokenizer, BLEU-4, METEOR, ROUGE-L and CIDEr-D).

SPICE is left out: its jar downloads Stanford CoreNLP models at run time, which a cluster
node without internet cannot do.  The PTB tokenizer and METEOR are Java programs.

References: a sample whose json carries ``references`` (the demo; a converter that wrote
the image's whole list) gives the image's reference list; otherwise the captions of all
the image's samples are collected (COCO converted one sample per caption: five per image).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
from collections import defaultdict

import torch

from .config import CAPTION_METRICS
from .data.transforms import load_tokenizer
from .distributed import gather_objects, lockstep_batches, rank, rank0_decides, world_size
from .models.caption import Generation, SpecialTokens, generate
from .objective import batch_to_device

file_log = logging.getLogger("dide_scale.file")
JAVA_HINT = ("the COCO caption metrics run Java (the PTB tokenizer and METEOR): install a Java runtime "
             "(Debian: apt-get install default-jre-headless)")


@contextlib.contextmanager
def _java_output_to_log(what: str):
    """The Java tools and pycocoevalcap print progress on this process' stdout/stderr file
    descriptors: keep it in the run's log file (and in the error when one is raised)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    printed = io.StringIO()  # Python's own prints, wherever sys.stdout points (pytest's capture)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stdout(printed):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            text = (printed.getvalue() + tmp.read().decode(errors="replace")).strip()
            if text:
                file_log.info("%s:\n%s", what, text)


_METEOR = []


def _meteor():
    """One METEOR process per Python process: it takes some 20 s to load its paraphrase
    table, so every evaluation of a run reuses it (it ends with the process)."""
    from pycocoevalcap.meteor.meteor import Meteor
    if not _METEOR or _METEOR[0].meteor_p.poll() is not None:
        try:
            _METEOR[:] = [Meteor()]
        except FileNotFoundError:
            raise RuntimeError(JAVA_HINT) from None
    return _METEOR[0]


def score_captions(predictions: dict, references: dict, metrics=CAPTION_METRICS) -> dict[str, float]:
    """{image id: caption} against {image id: [reference, ...]} -> {'bleu4', 'meteor', 'rouge_l',
    'cider'} (those in ``metrics``), each averaged over the images as pycocoevalcap does
    (BLEU at the corpus level).  Both sides go through the PTB tokenizer (lower case,
    punctuation removed) first."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    ids = sorted(predictions, key=str)
    missing = [i for i in ids if not references.get(i)]
    if missing:
        raise ValueError(f"{len(missing)} images have no reference caption, first: {missing[0]!r}")
    tok = PTBTokenizer()
    try:
        with _java_output_to_log("PTB tokenizer"):
            gts = tok.tokenize({i: [{"caption": r} for r in references[i]] for i in ids})
            res = tok.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    except FileNotFoundError:
        raise RuntimeError(JAVA_HINT) from None
    res = {i: res.get(i, [""]) for i in ids}  # an empty last caption leaves no line behind
    out = {}
    with _java_output_to_log("caption metrics"):
        if "bleu4" in metrics:
            out["bleu4"] = float(Bleu(4).compute_score(gts, res)[0][3])
        if "meteor" in metrics:
            out["meteor"] = float(_meteor().compute_score(gts, res)[0])
        if "rouge_l" in metrics:
            out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        if "cider" in metrics:
            out["cider"] = float(Cider().compute_score(gts, res)[0])
    return out


class ReferenceBook:
    """Each image's references as a split's batches reveal them (see the module doc)."""

    def __init__(self):
        self.given: dict[str, list[str]] = {}
        self.collected: dict[str, list[str]] = defaultdict(list)

    def add(self, image_id: str, caption: str, references: list[str]) -> None:
        if references:
            self.given.setdefault(image_id, list(references))
        else:
            self.collected[image_id].append(caption)

    def merge(self, other: "ReferenceBook") -> None:
        for k, v in other.given.items():
            self.given.setdefault(k, v)
        for k, v in other.collected.items():
            self.collected[k] += v

    def get(self, image_id: str) -> list[str]:
        return self.given.get(image_id) or self.collected.get(image_id, [])


@torch.no_grad()
def decode_split(model, loader, tokenizer, settings: Generation, device, dtype=torch.float32, max_batches: int = 0,
                 progress: bool = False, group=None) -> tuple[dict[str, str], ReferenceBook]:
    """Captions of every image of ``loader`` (each decoded once, in batches) and its references.
    In a process group each rank decodes its share in lock-step (every rank decodes a batch
    at every step, all ``max_length`` steps, a rank out of data its last batch again), so
    ZeRO-3's collective parameter gathers match; the results are merged over the ranks."""
    tokens = SpecialTokens.of(tokenizer)
    lockstep = world_size() > 1
    was = model.training
    model.eval()
    preds: dict[str, str] = {}
    book = ReferenceBook()
    for last, have in lockstep_batches(loader, max_batches, lockstep, group, progress, "captions"):
        ids = last["image_ids"]
        new = [j for j, iid in enumerate(ids) if iid not in preds and ids.index(iid) == j] if have else []
        if have:
            for iid, cap, refs in zip(ids, last["captions"], last["references"]):
                book.add(iid, cap, refs)
        if not new and not lockstep:
            continue
        b = batch_to_device(last, device, dtype)
        out = generate(model, b["images"][new or [0]], tokens, settings, early_stop=not lockstep)
        for j, (seq, _) in zip(new, out):
            preds[ids[j]] = tokenizer.decode(seq, skip_special_tokens=True)
    model.train(was)
    if lockstep:
        merged: dict[str, str] = {}
        all_books = ReferenceBook()
        for p, bk in gather_objects((preds, book), group):
            for k, v in p.items():
                merged.setdefault(k, v)
            all_books.merge(bk)
        preds, book = merged, all_books
    return preds, book


def evaluate_captions(model, loader, tokenizer, settings: Generation, device, dtype=torch.float32,
                      metrics=CAPTION_METRICS, max_batches: int = 0, progress: bool = False, group=None) -> dict:
    """Decode the split and score it.  Returns {'accuracy': CIDEr-D (the selection score), 'n':
    images, 'per_type': every metric, 'predictions': [{'image_id', 'caption'}] (the COCO
    results format)}; in a process group rank 0 scores and every rank returns its result."""
    preds, book = decode_split(model, loader, tokenizer, settings, device, dtype, max_batches, progress, group)
    res = None
    if rank() == 0:
        scores = score_captions(preds, {k: book.get(k) for k in preds}, metrics)
        res = {"accuracy": scores["cider"], "n": len(preds), "per_type": scores,
               "predictions": [{"image_id": k, "caption": v} for k, v in sorted(preds.items())]}
    return rank0_decides(res, group)


def write_results(predictions: list[dict], path: str) -> None:
    """The COCO caption results file: a JSON list of {"image_id", "caption"} (numeric ids as
    integers, as COCO's evaluation server reads them)."""
    rows = [{"image_id": int(p["image_id"]) if str(p["image_id"]).isdigit() else p["image_id"],
             "caption": p["caption"]} for p in predictions]
    with open(path, "w") as f:
        json.dump(rows, f)


def eval_main(model, cfg, loader, args, device, group=None, is_main: bool = True) -> int:
    """``dide-eval`` on a captioner: decode with the export's settings (or ``--beam`` /
    ``--max-length`` / ``--length-penalty``), print the scores, write the results file (rank
    0; under torchrun or srun each rank decodes its share)."""
    import dataclasses

    c = cfg.caption
    settings = Generation(args.beam or c.beam_size, args.max_length or c.max_length,
                          c.length_penalty if args.length_penalty is None else args.length_penalty)
    try:
        res = evaluate_captions(model.to(device), loader, load_tokenizer(cfg.data.tokenizer), settings, device,
                                metrics=c.metrics, max_batches=cfg.train.eval_batches, progress=is_main, group=group)
    except (RuntimeError, ValueError) as e:
        print(f"dide-eval: error: {e}", file=sys.stderr)
        return 2
    if not is_main:
        return 0
    if args.captions_json:
        write_results(res["predictions"], args.captions_json)
    res.pop("predictions")
    json.dump({**res, "decoding": dataclasses.asdict(settings)}, sys.stdout, indent=2)
    print()
    return 0
