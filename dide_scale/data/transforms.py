"""Per-sample decoding and per-batch collation, run inside data-loader workers.

One decode serves both models: images become uint8 [3, H, W] at the model resolution and
each model normalises them itself on the device; text is tokenised once (the teacher must
see the same tokens as the student, which ``check_tokenizers`` enforces at build time).
Bad samples raise :class:`SkipSample` with a reason; the reader counts and drops them.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

Image.MAX_IMAGE_PIXELS = None  # we enforce our own, cheaper, header-based limit
# PIL hands numpy a read-only buffer; the tensor is only ever read (resize or collate make
# the copy that is needed anyway), so sharing it saves a copy per image.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

SNLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """A transformers tokenizer: a local directory or hub id, or 'builtin:demo'."""
    from transformers import AutoTokenizer, BertTokenizerFast
    if name == "builtin:demo":
        from .demo import write_vocab
        d = write_vocab(tempfile.mkdtemp(prefix="dide_demo_vocab_"))
        return BertTokenizerFast.from_pretrained(str(d))  # works for transformers 4 and 5
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise FileNotFoundError(f"data.tokenizer={name!r}: not a tokenizer directory and not reachable "
                                f"as a hub id ({e.__class__.__name__})") from None


def decode_image(data: bytes, size: tuple[int, int], max_pixels: int) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 [3, H, W], contiguous.

    The header is read first (no pixel decode) to reject oversized images; JPEGs are then
    decoded at a reduced DCT scale (``draft``) where the size allows, and resized with
    torch's uint8 antialiased bilinear kernel (about 6x faster than PIL's resize here;
    tools/bench_data.py has the profile).
    """
    h, w = size
    if data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise SkipSample("truncated_image")  # no end-of-image marker: libjpeg would pad silently
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise SkipSample("oversized_image")
        if img.format == "JPEG":
            img.draft("RGB", (w, h))
        if img.mode != "RGB":
            img = img.convert("RGB")
        t = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)  # asarray runs the decode
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise SkipSample("corrupt_image") from None
    if t.shape[1:] != (h, w):
        t = torch.nn.functional.interpolate(t[None], size=(h, w), mode="bilinear", antialias=True)[0]
    return t.contiguous()


def stack_shared(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, straight into shared memory inside a DataLoader worker (as torch's
    ``default_collate`` does), so the batch reaches the main process without a second copy."""
    from torch.utils.data import get_worker_info
    out = None
    if get_worker_info() is not None:
        e = tensors[0]
        storage = e._typed_storage()._new_shared(len(tensors) * e.numel(), device=e.device)
        out = e.new(storage).resize_(len(tensors), *e.shape)
    return torch.stack(tensors, 0, out=out)


def decode_text(data: bytes | str | None, reason: str = "missing_caption") -> str:
    if data is None:
        raise SkipSample(reason)
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else str(data)
    except UnicodeDecodeError:
        raise SkipSample("non_utf8_caption") from None
    text = text.strip()
    if not text:
        raise SkipSample("empty_caption")
    return text


class SampleDecoder:
    """Raw tar sample (suffix -> bytes) -> dict(pixels, text, [pixels2], [label], meta).

    Picklable (plain attributes), so it runs in data-loader workers.
    """

    def __init__(self, task: str, image_size: tuple[int, int], max_pixels: int = 40_000_000,
                 answers: list[str] | None = None):
        self.task, self.size, self.max_pixels = task, tuple(image_size), max_pixels
        self.answers = {a: i for i, a in enumerate(answers or [])}

    def __call__(self, raw: dict) -> dict:
        img = raw.get("jpg", raw.get("png", raw.get("jpeg")))
        if img is None:
            raise SkipSample("missing_image")
        meta = {}
        if "json" in raw:
            try:
                text = raw["json"].decode("utf-8")
            except UnicodeDecodeError:
                raise SkipSample("non_utf8_caption") from None
            try:
                meta = json.loads(text)
            except ValueError:
                raise SkipSample("bad_json") from None
        out = {"key": raw.get("__key__", ""), "qtype": meta.get("qtype", "")}
        if self.task == "itm":
            out["text"] = decode_text(raw.get("txt"))
            out["image_id"] = str(meta.get("image_id", out["key"]))  # retrieval: captions of one image
        elif self.task == "vqa":
            out["text"] = decode_text(meta.get("question"), "missing_question")
            target = torch.zeros(len(self.answers))
            for ans, score in (meta.get("answers") or {}).items():
                if ans in self.answers:
                    target[self.answers[ans]] = float(score)
            out["label"] = target
            out["question_id"] = meta.get("question_id", out["key"])
        elif self.task == "nlvr2":
            out["text"] = decode_text(meta.get("sentence"), "missing_sentence")
            if "image2.jpg" not in raw:
                raise SkipSample("missing_image")
            out["pixels2"] = decode_image(raw["image2.jpg"], self.size, self.max_pixels)
            out["label"] = int(bool(meta.get("label")))
        elif self.task == "snli_ve":
            out["text"] = decode_text(meta.get("hypothesis"), "missing_hypothesis")
            if meta.get("label") not in SNLI_LABELS:
                raise SkipSample("bad_label")
            out["label"] = SNLI_LABELS[meta["label"]]
        out["pixels"] = decode_image(img, self.size, self.max_pixels)
        return out


class Collate:
    """List of decoded samples -> batch; tokenises the whole batch in one fast-tokenizer call."""

    def __init__(self, tokenizer_name: str, max_len: int):
        self.tokenizer_name, self.max_len = tokenizer_name, max_len

    def __call__(self, samples: list[dict]) -> dict:
        tok = load_tokenizer(self.tokenizer_name)
        enc = tok([s["text"] for s in samples], padding="max_length", truncation=True, max_length=self.max_len,
                  return_tensors="pt")
        batch = {"pixels": stack_shared([s["pixels"] for s in samples]),
                 "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "keys": [s["key"] for s in samples], "qtype": [s["qtype"] for s in samples]}
        if "image_id" in samples[0]:
            batch["image_ids"] = [s["image_id"] for s in samples]
        if "pixels2" in samples[0]:
            batch["pixels2"] = stack_shared([s["pixels2"] for s in samples])
        if "label" in samples[0]:
            lab = [s["label"] for s in samples]
            batch["labels"] = torch.stack(lab) if isinstance(lab[0], torch.Tensor) else torch.tensor(lab)
        if "question_id" in samples[0]:
            batch["question_id"] = [s["question_id"] for s in samples]
        return batch


def check_tokenizers(student_tok, teacher_dir: str | None) -> None:
    """The teacher must see the student's tokens: compare vocabularies when the teacher
    directory ships its own tokenizer."""
    if not teacher_dir or not os.path.exists(os.path.join(teacher_dir, "vocab.txt")):
        return
    with open(os.path.join(teacher_dir, "vocab.txt")) as f:
        teacher_vocab = [line.rstrip("\n") for line in f]
    student_vocab = [t for t, _ in sorted(student_tok.get_vocab().items(), key=lambda kv: kv[1])]
    if teacher_vocab != student_vocab:
        raise ValueError(f"teacher.path={teacher_dir} ships a tokenizer whose vocabulary differs from "
                         "data.tokenizer: attention distillation needs both models to see the same tokens; "
                         f"set data.tokenizer={teacher_dir}")
