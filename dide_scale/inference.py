"""Inference with the dual encoder: encode images once, cache them, fuse with any text.

The student's fusion only reads the two pooled [CLS] vectors, so an image's cached
embedding is a single vector: answering a new question about a cached image costs one text-tower pass
plus a small MLP, and scoring N images x M texts costs N + M tower passes plus N x M MLP
evaluations (never N x M transformer passes, as a fusion model needs).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from .models.images import Images


class DualEncoderInference:
    """Batch API over an (exported or in-training) DualEncoder."""

    def __init__(self, model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 prepare: bool = True):
        """``prepare``: move the model to ``device``/``dtype`` (False: it is already there,
        e.g. inside a DeepSpeed engine); the model is put in eval mode either way."""
        self.model = model.eval().to(device=device, dtype=dtype) if prepare else model.eval()
        self.device, self.dtype = torch.device(device), dtype

    def _images(self, images: Images) -> Images:
        p = images.patches.to(self.device)
        p = p.to(self.dtype).div(255.0) if p.dtype == torch.uint8 else p.to(self.dtype)
        return Images(p, images.coord.to(self.device), images.valid.to(self.device))

    @torch.inference_mode()
    def encode_images(self, images: Images) -> torch.Tensor:
        """Images (uint8 or [0,1] patches) -> cached embeddings [N, width] (pooled [CLS])."""
        return self.model.pool_image(self.model.encode_image(self._images(images), cls_only=True))

    @torch.inference_mode()
    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.pool_text(self.model.encode_text(input_ids.to(self.device), attention_mask.to(self.device),
                                                           cls_only=True))

    @torch.inference_mode()
    def predict(self, text_emb: torch.Tensor, image_emb: torch.Tensor, image_emb2: torch.Tensor | None = None):
        """Task logits for aligned rows (text i with image i)."""
        return self.model.classify(text_emb, image_emb, image_emb2)

    @torch.inference_mode()
    def pair_scores(self, text_emb: torch.Tensor, image_emb: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """[M, N] match scores of every text with every image from cached embeddings
        (ITM head: logit of 'match' minus 'no match'; other heads: max logit)."""
        m, n = text_emb.shape[0], image_emb.shape[0]
        out = torch.empty(m, n, device=text_emb.device, dtype=torch.float32)
        ti = torch.arange(m, device=text_emb.device).repeat_interleave(n)
        ii = torch.arange(n, device=text_emb.device).repeat(m)
        for s in range(0, m * n, chunk):
            t, i = ti[s:s + chunk], ii[s:s + chunk]
            logits = self.model.head(self.model.fuse(text_emb[t], image_emb[i])).float()
            score = logits[:, 1] - logits[:, 0] if logits.shape[-1] == 2 else logits.max(-1).values
            out.view(-1)[s:s + chunk] = score
        return out


def throughput(fns: dict[str, Callable[[], object]], n_items: int, warmup: int = 1, rounds: int = 5,
               sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Items per second of each function, timed in alternation: every round calls each
    function once, so a change in machine load during the measurement hits all of them
    alike; the median round per function is reported."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: n_items / statistics.median(v) for k, v in times.items()}


def compare_vqa_throughput(student, teacher, images: Images, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor, questions_per_image: int = 1, device="cpu",
                           dtype=torch.float32, repeats: int = 5, sync=lambda: None,
                           ablate_cls_only: bool = False) -> dict[str, float]:
    """Questions/s of the teacher, the uncached student and the student with cached image
    embeddings, measured side by side on the same batch (ratios are what to compare).
    ``ablate_cls_only`` also times the cached path with a full last text block."""
    inf = DualEncoderInference(student, device, dtype)
    teacher = teacher.eval().to(device=device, dtype=dtype)
    imgs = inf._images(images)
    ids, mask = input_ids.to(device), attention_mask.to(device)
    n = ids.shape[0]
    img_idx = torch.arange(n, device=device) // questions_per_image  # several questions per image
    rows = imgs[img_idx % len(imgs)]
    cache = inf.encode_images(imgs[: (n + questions_per_image - 1) // questions_per_image])

    @torch.inference_mode()
    def run_teacher():
        return teacher(rows, ids, mask)

    def run_uncached():
        return inf.predict(inf.encode_texts(ids, mask), inf.encode_images(rows))

    def run_cached():
        return inf.predict(inf.encode_texts(ids, mask), cache[img_idx % cache.shape[0]])

    fns = {"teacher": run_teacher, "student_uncached": run_uncached, "student_cached": run_cached}
    if ablate_cls_only:
        @torch.inference_mode()
        def run_cached_full_last_block():
            t = inf.model.pool_text(inf.model.encode_text(ids, mask))
            return inf.predict(t, cache[img_idx % cache.shape[0]])
        fns["student_cached_full_last_block"] = run_cached_full_last_block
    res = throughput(fns, n, rounds=repeats, sync=sync)
    res["speedup_uncached"] = res["student_uncached"] / res["teacher"]
    res["speedup_cached"] = res["student_cached"] / res["teacher"]
    return res
