"""Inference with the dual encoder: encode images once, cache them, fuse with any text.

The student's fusion only reads the two pooled [CLS] vectors, so an image's cached
embedding is a single vector: answering a new question about a cached image costs one text-tower pass
plus a small MLP, and scoring N images x M texts costs N + M tower passes plus N x M MLP
evaluations (never N x M transformer passes, as a fusion model needs).
"""
from __future__ import annotations

import collections
import statistics
import time
from typing import Callable

import torch

from .console import quiet_libraries
from .data.transforms import pack_patches, read_geometry, resize_image
from .models.caption import Generation, SpecialTokens, generate
from .models.images import Images, patchify
from .models.saved import load_pretrained
from .models.sources import resolve_source


class DualEncoderInference:
    """Batch API over an (exported or in-training) DualEncoder."""

    def __init__(self, model, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 prepare: bool = True, cls_only: bool = True):
        """``prepare``: move the model to ``device``/``dtype`` (False: it is already there,
        e.g. inside a DeepSpeed engine); the model is put in eval mode either way.
        ``cls_only=False`` runs every token through the towers' last blocks: ZeRO-3 gathers a
        block's parameters only in its own forward, which the [CLS]-only block bypasses."""
        self.model = model.eval().to(device=device, dtype=dtype) if prepare else model.eval()
        self.device, self.dtype, self.cls_only = torch.device(device), dtype, cls_only

    def _images(self, images: Images) -> Images:
        p = images.patches.to(self.device)
        p = p.to(self.dtype).div(255.0) if p.dtype == torch.uint8 else p.to(self.dtype)
        return Images(p, images.coord.to(self.device), images.valid.to(self.device))

    @torch.inference_mode()
    def encode_images(self, images: Images) -> torch.Tensor:
        """Images (uint8 or [0,1] patches) -> cached embeddings [N, width] (pooled [CLS])."""
        return self.model.pool_image(self.model.encode_image(self._images(images), cls_only=self.cls_only))

    @torch.inference_mode()
    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.pool_text(self.model.encode_text(input_ids.to(self.device), attention_mask.to(self.device),
                                                           cls_only=self.cls_only))

    @torch.inference_mode()
    def predict(self, text_emb: torch.Tensor, image_emb: torch.Tensor, image_emb2: torch.Tensor | None = None):
        """Task logits for aligned rows (text i with image i)."""
        return self.model.classify(text_emb, image_emb, image_emb2)

    @torch.inference_mode()
    def match_scores(self, text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
        """Float32 match scores of aligned rows (text i with image i) from cached embeddings
        (ITM head: logit of 'match' minus 'no match'; other heads: max logit)."""
        logits = self.model.head(self.model.fuse(text_emb, image_emb)).float()
        return logits[:, 1] - logits[:, 0] if logits.shape[-1] == 2 else logits.max(-1).values

    @torch.inference_mode()
    def pair_scores(self, text_emb: torch.Tensor, image_emb: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """[M, N] match scores (``match_scores``) of every text with every image."""
        m, n = text_emb.shape[0], image_emb.shape[0]
        out = torch.empty(m, n, device=text_emb.device, dtype=torch.float32)
        ti = torch.arange(m, device=text_emb.device).repeat_interleave(n)
        ii = torch.arange(n, device=text_emb.device).repeat(m)
        for s in range(0, m * n, chunk):
            t, i = ti[s:s + chunk], ii[s:s + chunk]
            out.view(-1)[s:s + chunk] = self.match_scores(text_emb[t], image_emb[i])
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


class Predictor:
    """Answers from an exported model folder, with nothing else: no DeepSpeed, no teacher, no
    run directory.  Images (PIL images, encoded bytes or file paths) are sized exactly as in
    training (the folder's ``preprocessor_config.json``), texts tokenised with the folder's
    tokenizer.  A dual encoder's image embeddings are cached by content (``cache_size``
    images), so more questions about an image cost one text-tower pass each.

        predictor = Predictor.from_pretrained("runs/finetune_vqa/best")
        predictor.answer([Image.open("kitchen.jpg")] * 2, ["what is on the table?", "is the light on?"])
        # [[('plate', 0.71)], [('yes', 0.93)]]
        Predictor.from_pretrained("runs/caption/best").caption([Image.open("kitchen.jpg")], beam=5)
        # ['a plate of food on a table']
    """

    def __init__(self, model, tokenizer, geometry, device="cpu", dtype: torch.dtype = torch.float32,
                 cache_size: int = 1024):
        self.model, self.tokenizer, self.geometry = model.eval().to(device=device, dtype=dtype), tokenizer, geometry
        self.device, self.dtype = torch.device(device), dtype
        self.dual = hasattr(model, "encode_image")
        self.inf = DualEncoderInference(self.model, device, dtype, prepare=False) if self.dual else None
        self.cache: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
        self.cache_size = cache_size
        self.labels = model.labels or (["no match", "match"] if model.task == "itm" else None)

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype: torch.dtype = torch.float32, **kw) -> "Predictor":
        """A local folder written by ``dide_scale.export``, or a Hub repository id.  A path that
        names neither raises ``FileNotFoundError`` in one line."""
        from transformers import AutoTokenizer

        quiet_libraries()
        root = resolve_source(path, "model")
        return cls(load_pretrained(root), AutoTokenizer.from_pretrained(root), read_geometry(root), device, dtype,
                   **kw)

    # -- inputs ----------------------------------------------------------------------------
    @staticmethod
    def _key(image) -> str:
        import hashlib
        if isinstance(image, (bytes, bytearray)):
            return hashlib.sha1(image).hexdigest()
        if isinstance(image, str):
            return "path:" + image
        return hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()

    def images(self, images: list) -> Images:
        """PIL images, encoded bytes or paths -> the padded patch batch the model takes."""
        import io

        from PIL import Image

        p = self.geometry.patch
        items = []
        for im in images:
            if isinstance(im, (bytes, bytearray)):
                im = Image.open(io.BytesIO(im))
            elif isinstance(im, str):
                im = Image.open(im)
            t = resize_image(im, self.geometry)
            items.append((patchify(t, p), t.shape[1] // p, t.shape[2] // p))
        return Images(*pack_patches(items, self.geometry.max_patches))

    def texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.model.shape.max_text_len, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def embed_images(self, images: list) -> torch.Tensor:
        """Cached image embeddings [N, width] (a dual encoder's pooled [CLS] vectors)."""
        if not self.dual:
            raise ValueError("a fusion model has no image embeddings of its own: it reads image and text together")
        keys = [self._key(im) for im in images]
        todo = {k: im for k, im in zip(keys, images) if k not in self.cache}
        if todo:
            emb = self.inf.encode_images(self.images(list(todo.values())))
            for k, e in zip(todo, emb):
                self.cache[k] = e
        for k in keys:
            self.cache.move_to_end(k)
        out = torch.stack([self.cache[k] for k in keys])
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return out

    # -- outputs ---------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, images: list, texts: list[str], images2: list | None = None) -> torch.Tensor:
        """Task logits for aligned rows: text i with image i (and image2 i for NLVR2)."""
        ids, mask = self.texts(texts)
        if self.dual:
            second = self.embed_images(images2) if images2 is not None else None
            return self.inf.predict(self.inf.encode_texts(ids, mask), self.embed_images(images), second).float()
        pix = self.inf_images(images)
        pix2 = self.inf_images(images2) if images2 is not None else None
        return self.model(pix, ids, mask, pix2).logits.float()

    def inf_images(self, images: list) -> Images:
        im = self.images(images)
        return Images(im.patches.to(self.device, self.dtype).div(255.0), im.coord.to(self.device),
                      im.valid.to(self.device))

    def answer(self, images: list, questions: list[str], images2: list | None = None,
               top_k: int = 1) -> list[list[tuple[str, float]]]:
        """The ``top_k`` answers with their scores for each (image, question) row: VQA answers
        with sigmoid scores, SNLI-VE / NLVR2 / ITM labels with softmax probabilities."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images for {len(questions)} questions: one image per question")
        logits = self.logits(images, questions, images2)
        probs = torch.sigmoid(logits) if self.model.task == "vqa" else torch.softmax(logits, -1)
        top = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        names = self.labels or [str(i) for i in range(probs.shape[-1])]
        return [[(names[i], round(float(v), 6)) for v, i in zip(vals, idx)]
                for vals, idx in zip(top.values.tolist(), top.indices.tolist())]

    @torch.inference_mode()
    def caption(self, images: list, beam: int | None = None, max_length: int | None = None,
                length_penalty: float | None = None, batch_size: int = 64) -> list[str]:
        """A captioner's caption of each image, decoded in batches with the export's settings
        (``generation`` in its config.json) unless given here; ``beam=1`` is greedy."""
        g = getattr(self.model, "generation", None)
        if g is None:
            raise ValueError(f"a {self.model.task} model does not generate captions (export one trained with "
                             "train.task=caption)")
        settings = Generation(beam or g.beam_size, max_length or g.max_length,
                              g.length_penalty if length_penalty is None else length_penalty)
        tokens = SpecialTokens.of(self.tokenizer)
        out = []
        for i in range(0, len(images), batch_size):
            for ids, _ in generate(self.model, self.inf_images(images[i:i + batch_size]), tokens, settings):
                out.append(self.tokenizer.decode(ids, skip_special_tokens=True))
        return out

    @torch.inference_mode()
    def scores(self, images: list, texts: list[str]) -> torch.Tensor:
        """[texts, images] match scores of every text with every image (an ITM dual encoder:
        N + M tower passes and N x M small MLPs)."""
        ids, mask = self.texts(texts)
        return self.inf.pair_scores(self.inf.encode_texts(ids, mask), self.embed_images(images))
