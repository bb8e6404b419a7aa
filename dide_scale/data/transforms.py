"""Per-sample decoding and per-batch collation, run inside data-loader workers.

One decode serves both models.  An image is resized by ViLT's rule (the shorter side to
``shorter``, the longer side at most ``longer``, both floored to multiples of the patch
size, aspect ratio kept; see :class:`Geometry`) with the kernel transformers'
``ViltImageProcessor`` uses (torch's antialiased bicubic on uint8), then cut into patches.
A batch holds each image as a padded sequence of patches with 2-D coordinates and a
validity mask (timm NaFlexViT's layout): ``patches`` uint8 [B, N, P*P*3] (P-P-C, channel
fastest), ``patch_coord`` [B, N, 2] (row, column in the image's own grid), ``patch_valid``
[B, N] bool, where N = ``Geometry.max_patches`` for every batch, so shapes stay static.
Each model normalises the pixels itself on the device; text is tokenised once (the
teacher must see the student's tokens, which ``check_tokenizers`` enforces).
Bad samples raise :class:`SkipSample` with a reason; the reader counts and drops them.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..console import quiet_libraries
from ..models.images import patchify, raster_coords
from ..models.sources import TOKENIZER_FILES, resolve_source
from .demo import write_vocab
from .shards import SNLI_VE_NAMES

Image.MAX_IMAGE_PIXELS = None  # we enforce our own, cheaper, header-based limit
# PIL hands numpy a read-only buffer; the tensor is only ever read (resize or collate make
# the copy that is needed anyway), so sharing it saves a copy per image.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

SNLI_LABELS = {name: i for i, name in enumerate(SNLI_VE_NAMES)}
PREPROCESSOR = "preprocessor_config.json"  # an exported model's image geometry and normalisation


def vilt_size(h: int, w: int, shorter: int, longer: int, divisor: int) -> tuple[int, int]:
    """ViLT's resize rule (``ViltImageProcessor.resize``; ``MinMaxResize`` in the original
    ViLT code), written with the same float operations so the sizes agree exactly: the
    shorter side to ``shorter``, then everything scaled down if the longer side exceeds
    ``longer``, rounded, and floored to multiples of ``divisor``.  Unlike the processor, a
    side never drops below one patch (an extreme panorama would otherwise get none)."""
    if h < w:
        new_h, new_w = shorter, w * (shorter / h)
    else:
        new_h, new_w = h * (shorter / w), shorter
    if max(new_h, new_w) > longer:
        scale = longer / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    new_h, new_w = int(new_h + 0.5), int(new_w + 0.5)
    return max(divisor, new_h // divisor * divisor), max(divisor, new_w // divisor * divisor)


@dataclass(frozen=True)
class Geometry:
    """How an image becomes patches (picklable: it runs in data-loader workers).

    ``resize='vilt'``: aspect ratio kept by :func:`vilt_size` (a portrait image gets its long
    side vertical, as in ViLT); ``'stretch'``: every image resized to exactly
    ``shorter x longer`` (height x width) whatever its aspect ratio.  Every batch is padded to
    ``max_patches`` patches per image, the most that either rule can produce."""

    resize: str = "vilt"
    shorter: int = 384
    longer: int = 639
    patch: int = 32

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        if self.resize == "stretch":
            return self.shorter // self.patch * self.patch, self.longer // self.patch * self.patch
        return vilt_size(h, w, self.shorter, self.longer, self.patch)

    @property
    def max_patches(self) -> int:
        return max(1, self.shorter // self.patch) * max(1, self.longer // self.patch)


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """A transformers tokenizer: a local directory, a Hub id (``models.sources``: its tokenizer
    files, from the local Hub cache or fetched once), or 'builtin:demo'."""
    from transformers import AutoTokenizer, BertTokenizerFast

    quiet_libraries()  # an exported folder's config.json would make transformers warn on every load
    if name == "builtin:demo":
        d = write_vocab(tempfile.mkdtemp(prefix="dide_demo_vocab_"))
        return BertTokenizerFast.from_pretrained(str(d))  # works for transformers 4 and 5
    path = resolve_source(name, "data.tokenizer", TOKENIZER_FILES)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"data.tokenizer={name!r}: not a tokenizer directory and not reachable "
                                f"as a hub id ({e.__class__.__name__})") from None


def decode_image(data: bytes, geometry: Geometry, max_pixels: int, draft: bool = False) -> torch.Tensor:
    """JPEG/PNG bytes -> uint8 [3, H, W] at ``geometry``'s size for this image.

    The header is read first (no pixel decode) to reject oversized images; then
    :func:`resize_image`.  Undecodable data raises ``SkipSample``.
    """
    if data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise SkipSample("truncated_image")  # no end-of-image marker: libjpeg would pad silently
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise SkipSample("oversized_image")
        return resize_image(img, geometry, draft)
    except SkipSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise SkipSample("corrupt_image") from None


def resize_image(img: Image.Image, geometry: Geometry, draft: bool = False) -> torch.Tensor:
    """A PIL image -> uint8 [3, H, W] at ``geometry``'s size for it.

    The resize is ``torch.nn.functional.interpolate(mode='bicubic', antialias=True)`` on uint8,
    which is what transformers' ``ViltImageProcessor`` runs on CPU, so a teacher sees the
    pixels its own processor would give it.  ``draft`` lets libjpeg decode large JPEGs at a
    reduced DCT scale first (much faster for photos several times the target size, but the
    pixels then differ slightly from the processor's)."""
    h, w = geometry.output_size(img.height, img.width)  # from the original size, draft or not
    if draft and img.format == "JPEG":
        img.draft("RGB", (w, h))
    if img.mode != "RGB":
        img = img.convert("RGB")
    # [1, 3, H, W] over the HWC buffer (asarray runs the decode); built from the 4-d view so its
    # strides say channels-last unambiguously and the resize returns channels-last too
    # (patchify then reads contiguous pixel rows)
    t = torch.from_numpy(np.asarray(img))[None].permute(0, 3, 1, 2)
    if t.shape[2:] != (h, w):
        t = torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    return t[0]


class RandAugment:
    """torchvision's ``RandAugment(ops, magnitude)`` on uint8 [3, H, W], with its random draws
    seeded from the sample's position in the stream (``seed``), so a resumed run augments
    every sample exactly as the uninterrupted one did.  Picklable."""

    def __init__(self, ops: int, magnitude: int):
        self.ops, self.magnitude = ops, magnitude
        self._aug = None

    def __call__(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        if self._aug is None:
            import torchvision.transforms as T
            self._aug = T.RandAugment(num_ops=self.ops, magnitude=self.magnitude)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._aug(image)


def shared_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor, in shared memory inside a DataLoader worker (as torch's
    ``default_collate`` does), so the batch reaches the main process without a second copy."""
    from torch.utils.data import get_worker_info
    if get_worker_info() is None:
        return torch.zeros(shape, dtype=dtype)
    n = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(n, device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).resize_(*shape).zero_()


def pack_patches(images: list[tuple[torch.Tensor, int, int]], max_patches: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(patches [n, D], gh, gw), ...] -> (patches [B, N, D] uint8, coord [B, N, 2] int32,
    valid [B, N] bool) with N = ``max_patches``; padding is zeros at coordinate (0, 0)."""
    b, d = len(images), images[0][0].shape[1]
    patches = shared_zeros((b, max_patches, d), torch.uint8)
    coord = torch.zeros(b, max_patches, 2, dtype=torch.int32)
    valid = torch.zeros(b, max_patches, dtype=torch.bool)
    for i, (p, gh, gw) in enumerate(images):
        n = p.shape[0]
        if n > max_patches:
            raise ValueError(f"an image has {n} patches but the batch holds {max_patches}")
        patches[i, :n] = p
        coord[i, :n] = raster_coords(gh, gw)
        valid[i, :n] = True
    return patches, coord, valid


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
    """Raw tar sample (suffix -> bytes) -> dict(image, text, [image2], [label], meta), where an
    image is ``(patches [n, P*P*3] uint8, grid rows, grid cols)``.

    ``augment`` (fine-tuning) is applied once per image after the resize, so the teacher and
    the student see the same augmented pixels; its randomness comes from ``raw['__seed__']``
    (set by the reader from the sample's stream position).  Picklable (plain attributes),
    so it runs in data-loader workers.
    """

    def __init__(self, task: str, geometry: Geometry, max_pixels: int = 40_000_000,
                 answers: list[str] | None = None, draft: bool = False, augment: RandAugment | None = None):
        self.task, self.geometry, self.max_pixels = task, geometry, max_pixels
        self.draft, self.augment = draft, augment
        self.answers = {a: i for i, a in enumerate(answers or [])}

    def image(self, data: bytes, seed: int) -> tuple[torch.Tensor, int, int]:
        t = decode_image(data, self.geometry, self.max_pixels, self.draft)
        if self.augment is not None:
            t = self.augment(t, seed)
        p = self.geometry.patch
        return patchify(t, p), t.shape[1] // p, t.shape[2] // p

    def __call__(self, raw: dict) -> dict:
        img = raw.get("jpg", raw.get("png", raw.get("jpeg")))
        if img is None:
            raise SkipSample("missing_image")
        seed = int(raw.get("__seed__", 0))
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
            out["image2"] = self.image(raw["image2.jpg"], seed + 1)
            out["label"] = int(bool(meta.get("label")))
        elif self.task == "snli_ve":
            out["text"] = decode_text(meta.get("hypothesis"), "missing_hypothesis")
            if meta.get("label") not in SNLI_LABELS:
                raise SkipSample("bad_label")
            out["label"] = SNLI_LABELS[meta["label"]]
        elif self.task == "caption":
            out.update(caption_fields(raw, meta, out["key"], seed))
        out["image"] = self.image(img, seed)
        return out


def caption_fields(raw: dict, meta: dict, key: str, seed: int) -> dict:
    """A caption sample's own fields: the caption it trains on (``.txt``), the image it
    describes (``image_id``: the captions of one image are grouped by it), the image's whole
    reference list when the sample carries one (json ``references``; else evaluation collects
    the captions of the image's samples), and its seed (the masking of ``CaptionMasking``)."""
    refs = meta.get("references")
    return {"text": decode_text(raw.get("txt")), "image_id": str(meta.get("image_id", key)),
            "references": [str(r) for r in refs] if isinstance(refs, list) else [], "seed": seed}


@dataclass(frozen=True)
class CaptionMasking:
    """Oscar's caption-token masking (``CaptionTensorizer``): of a caption's tokens ([CLS] and
    [SEP] counted), ``round(prob * n)`` are predicted, at least 1 and at most ``max_masked``,
    chosen among every token but [CLS] ([SEP] included: the model learns where a caption
    ends); each is replaced by [MASK] with probability 0.8, by a random token of the
    vocabulary with 0.1, else kept.  Random draws come from the sample's seed, so a resumed
    run masks every sample as the first did.  Picklable."""

    prob: float
    max_masked: int
    mask_id: int
    vocab_size: int

    def __call__(self, ids: torch.Tensor, valid: torch.Tensor, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked ids [B, L], targets [B, L]: the original id where a token is predicted, -100
        elsewhere)."""
        import random
        ids, targets = ids.clone(), torch.full_like(ids, -100)
        for i, (n, seed) in enumerate(zip(valid.sum(1).tolist(), seeds)):
            rng = random.Random(seed)
            count = min(max(round(self.prob * n), 1), self.max_masked, n - 1)
            for pos in rng.sample(range(1, n), count):
                targets[i, pos] = ids[i, pos]
                u = rng.random()
                if u < 0.8:
                    ids[i, pos] = self.mask_id
                elif u < 0.9:
                    ids[i, pos] = rng.randrange(self.vocab_size)
        return ids, targets


class Collate:
    """List of decoded samples -> batch; tokenises the whole batch in one fast-tokenizer call
    and packs every image into ``max_patches`` patch slots."""

    def __init__(self, tokenizer_name: str, max_len: int, max_patches: int, masking: CaptionMasking | None = None):
        self.tokenizer_name, self.max_len, self.max_patches = tokenizer_name, max_len, max_patches
        self.masking = masking

    def __call__(self, samples: list[dict]) -> dict:
        tok = load_tokenizer(self.tokenizer_name)
        enc = tok([s["text"] for s in samples], padding="max_length", truncation=True, max_length=self.max_len,
                  return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "keys": [s["key"] for s in samples], "qtype": [s["qtype"] for s in samples]}
        for suffix in ("", "2"):
            if f"image{suffix}" in samples[0]:
                p, c, v = pack_patches([s[f"image{suffix}"] for s in samples], self.max_patches)
                batch.update({f"patches{suffix}": p, f"patch_coord{suffix}": c, f"patch_valid{suffix}": v})
        if "image_id" in samples[0]:
            batch["image_ids"] = [s["image_id"] for s in samples]
        if "label" in samples[0]:
            lab = [s["label"] for s in samples]
            batch["labels"] = torch.stack(lab) if isinstance(lab[0], torch.Tensor) else torch.tensor(lab)
        if "question_id" in samples[0]:
            batch["question_id"] = [s["question_id"] for s in samples]
        if "references" in samples[0]:
            batch["references"] = [s["references"] for s in samples]
            batch["captions"] = [s["text"] for s in samples]
        if self.masking is not None:
            batch["input_ids"], batch["caption_targets"] = self.masking(
                batch["input_ids"], batch["attention_mask"], [s["seed"] for s in samples])
        return batch


def check_tokenizers(student_tok, teacher_dir: str | None, teacher_vocab_size: int | None = None) -> None:
    """The teacher must see the student's tokens: every token id must exist in its embedding
    table (``teacher_vocab_size``), and the vocabularies must agree when the teacher directory
    ships its own tokenizer."""
    if teacher_vocab_size is not None and len(student_tok) > teacher_vocab_size:
        raise ValueError(f"data.tokenizer has {len(student_tok)} tokens but the teacher's embedding table only "
                         f"{teacher_vocab_size}: the teacher needs the tokenizer it was trained with")
    if not teacher_dir or not os.path.exists(os.path.join(teacher_dir, "vocab.txt")):
        return
    with open(os.path.join(teacher_dir, "vocab.txt")) as f:
        teacher_vocab = [line.rstrip("\n") for line in f]
    student_vocab = [t for t, _ in sorted(student_tok.get_vocab().items(), key=lambda kv: kv[1])]
    if teacher_vocab != student_vocab:
        raise ValueError(f"teacher.path={teacher_dir} ships a tokenizer whose vocabulary differs from "
                         "data.tokenizer: attention distillation needs both models to see the same tokens; "
                         f"set data.tokenizer={teacher_dir}")


# -- the geometry an exported model records (preprocessor_config.json) --------------------------
def preprocessor_config(cfg, module) -> dict:
    """How images reach the model.  transformers' ViltImageProcessor keys are written when they
    describe the geometry exactly (ViLT's rule with its own cap), so the folder also loads as
    one; ``dide_geometry`` is what ``Predictor`` reads."""
    d, p = cfg.data, cfg.student.arch.patch_size
    norm = getattr(module, "image", module).normalize  # the dual encoder's image tower, or the fusion model
    out = {"dide_geometry": {"resize": d.image_resize, "shorter": d.image_shorter, "longer": d.image_longer,
                             "patch": p},
           "image_mean": norm.mean.tolist(), "image_std": norm.std.tolist(), "jpeg_draft": d.jpeg_draft}
    if d.image_resize == "vilt" and d.image_longer == int(1333 / 800 * d.image_shorter):
        out.update({"image_processor_type": "ViltImageProcessor", "do_resize": True,
                    "size": {"shortest_edge": d.image_shorter}, "size_divisor": p, "resample": 3, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "do_pad": True})
    return out


def read_geometry(model_dir: str | Path):
    """The ``data.transforms.Geometry`` an exported model was trained with."""
    f = Path(model_dir) / PREPROCESSOR
    if not f.is_file():
        raise FileNotFoundError(f"{model_dir}: no {PREPROCESSOR} (export it again with this version)")
    g = json.loads(f.read_text())["dide_geometry"]
    return Geometry(g["resize"], int(g["shorter"]), int(g["longer"]), int(g["patch"]))
