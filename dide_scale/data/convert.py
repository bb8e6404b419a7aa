"""Dataset converters: official annotation files + image folders -> shards.

Every converter writes numbered ``.tar`` shards in the img2dataset layout (``{key}.jpg``,
``{key}.txt``, ``{key}.json``; NLVR2 adds ``{key}.image2.jpg``) plus ``sizes.json``, shows
a tqdm bar, and returns a stats dict (also saved as ``convert_stats.json`` in the output).

Choices:

* **Resumable.** Inputs are put in a deterministic order and every sample gets a unique,
  stable key. Shards are written atomically by :class:`ShardWriter`, and with each
  complete shard ``convert_stats.json`` records how many input items it accounts for and
  the skip counts so far. A re-run with the same ``out_dir`` skips that many items without
  reading their images, checks that the last one has the key of the last sample of the
  last complete shard (else: "another conversion" error), and continues at shard
  ``done_shards(out_dir)``; an interrupted conversion thus ends with the same samples, in
  the same shards, and the same counts as an uninterrupted one. (Counting items, not
  ``sum(sizes)`` samples, stays exact when items were skipped. If the stats file lags
  behind ``sizes.json`` the last key is searched for instead.) A re-run of a finished
  conversion changes nothing; use an empty ``out_dir`` for other inputs or options.
* **Image bytes.** JPEG files are copied byte for byte (no re-encoding); anything else (PNG,
  NLVR2's images) is decoded and re-encoded with :func:`jpeg_bytes` (alpha over white).
  Missing images, JPEGs without an end-of-image marker and undecodable files are skipped
  and counted (``missing_image``, ``truncated_image``, ``bad_image``).
* **Caption datasets (COCO, VG): one sample per (image, caption) pair**, as ViLT's
  pre-training does; the pairs are shuffled with a fixed seed so that the captions of one
  image are spread over the shards (in-batch ITM/ITC negatives must not be the same image).
  The image is stored once per pair. COCO keeps only Karpathy ``train``+``restval`` images
  when a Karpathy split file is given (``splits`` chooses others, e.g. ``("test",)`` for a
  retrieval set). VG keeps the region box in the json; ``max_regions_per_image`` bounds
  the storage (VG has ~50 regions per image), and with a Karpathy file the VG images that
  are COCO Karpathy val/test images are dropped too.
* **Task datasets** keep the input file's order; ``.txt`` holds the text the task reads
  (question, sentence, hypothesis) and ``.json`` the fields ``SampleDecoder`` reads.
* **VQAv2 answers**: normalised like the official evaluation (``vqaEval.py``:
  punctuation, lower case, number words -> digits, articles dropped, contractions), soft
  score = the official accuracy, i.e. the mean over the 10 leave-one-annotator-out subsets
  of ``min(1, matches/3)`` (0.3/0.6/0.9/1.0 for 1/2/3/4+ of 10 annotators: the values ViLT
  uses); ``answer_confidence`` is ignored, as by the official metric. The vocabulary is the
  ``num_answers`` most frequent normalised ``multiple_choice_answer`` of the given (train)
  annotations, ties broken alphabetically, written to ``answers.json``. Every normalised
  human answer is stored with its score; the decoder keeps those in the vocabulary.
  ``qtype`` = ``answer_type`` (yes/no, number, other) for per-type accuracy.
* **img2dataset output (CC3M, SBU)** is used as is: the tars are scanned (headers, in
  order, as the training reader groups them), truncated/unreadable shards are reported,
  and ``sizes.json`` (readable shards only) is written next to them. With
  ``samples_per_shard`` it is re-sharded into ``out_dir`` instead: complete samples (image
  and caption) keep their key and all members; the readable part of a broken shard is kept.
"""
from __future__ import annotations

import collections
import functools
import io
import json
import os
import random
import re
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

from PIL import Image
from tqdm import tqdm
from webdataset.tariterators import base_plus_ext

from ..fsutil import atomic_write_text
from .shards import ShardWriter, jpeg_bytes, read_sizes, sample, write_sizes

STATS = "convert_stats.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SNLI_LABELS = ("entailment", "neutral", "contradiction")

PathLike = str | os.PathLike
Item = tuple[str, Callable[[], dict]]  # (unique key, build the sample; raises Skip)


class InputError(ValueError):
    """A malformed or missing input file; the message names the file and what was expected."""


class Skip(Exception):
    """An input item that yields no sample; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------- input files
def _load_json(path: PathLike, expected: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (expected {expected})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); expected {expected}") from None


def _read_jsonl(path: PathLike, expected: str) -> list[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file; blank lines are ignored."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise InputError(f"{path}:{n}: not valid JSON ({e}); expected {expected}") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{path}:{n}: a JSON {type(obj).__name__}, expected {expected}")
                out.append((n, obj))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file (expected {expected})") from None
    return out


def _need(obj, fields: Sequence[str], where: str, expected: str) -> None:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a JSON {type(obj).__name__}, expected {expected}")
    missing = [k for k in fields if k not in obj]
    if missing:
        raise InputError(f"{where}: lacks {', '.join(map(repr, missing))}; expected {expected}")


def _list_field(doc, field: str, path: PathLike, expected: str) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get(field), list):
        got = f"keys {sorted(doc)[:8]}" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        raise InputError(f"{path}: expected {expected} with a {field!r} list; got {got}")
    return doc[field]


def _image_dir(d: PathLike) -> Path:
    p = Path(d)
    if not p.is_dir():
        raise InputError(f"{d}: not a directory (expected the image folder)")
    return p


def _index_files(root: PathLike) -> dict[str, Path]:
    """Image file name -> path, searched recursively (first in sorted order wins)."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(_image_dir(root), followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_SUFFIXES):
                out.setdefault(name, Path(dirpath) / name)
    return out


def _index_by_id(root: PathLike) -> dict[int, list[Path]]:
    """Numeric image id -> paths, from names ending in digits (``123.jpg``,
    ``COCO_val2014_000000000123.jpg``)."""
    out: dict[int, list[Path]] = collections.defaultdict(list)
    for name, path in _index_files(root).items():
        m = re.search(r"(\d+)$", name.rsplit(".", 1)[0])
        if m:
            out[int(m.group(1))].append(path)
    return out


def _check_unique(keys: Iterable, source: PathLike, what: str) -> None:
    seen = set()
    for k in keys:
        if k in seen:
            raise InputError(f"{source}: {what} {k!r} occurs twice; expected unique ids")
        seen.add(k)


def _safe_key(s: str) -> str:
    """A webdataset key: no dots (the key ends at the first dot) and no path separators."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(s))


# ---------------------------------------------------------------------------- image bytes
def image_bytes(path: Path | None) -> bytes:
    """JPEG bytes of an image file; JPEG is copied as is, other formats are re-encoded."""
    if path is None:
        raise Skip("missing_image")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Skip("missing_image") from None
    if data[:3] == b"\xff\xd8\xff":
        if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
            raise Skip("truncated_image")
        return data
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise Skip("bad_image") from None
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    return jpeg_bytes(img.convert("RGB"))


def _clean_text(s) -> str:
    return " ".join(str(s).split()) if s is not None else ""


# ---------------------------------------------------------------------------- the driver
def _last_key(shard: Path) -> str:
    key = None
    with tarfile.open(shard) as tf:
        for m in tf:
            if m.isreg():
                key = base_plus_ext(m.name)[0] or key
    if key is None:
        raise InputError(f"{shard}: an empty shard; remove the output directory and convert again")
    return key


def write_shards(items: Iterable[Item], out_dir: PathLike, samples_per_shard: int, *, desc: str = "convert",
                 total: int | None = None, info: dict | None = None, progress: bool = True) -> dict:
    """Write ``items`` in order into shards, resuming after the last complete shard.

    Returns stats: samples and shards in ``out_dir``, samples written by this call, and
    skipped items by reason (over the whole conversion, resumed parts included).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = read_sizes(out)
    saved = json.loads((out / STATS).read_text()) if sizes and (out / STATS).exists() else {}
    if saved.get("complete") and saved.get("shards") == len(sizes):
        return {**saved, "written": 0}
    last = _last_key(out / max(sizes)) if sizes else None
    # where to continue: the item count saved with the last shard, checked against its last
    # key; if the process died between writing sizes.json and the stats, search for the key
    resume_at = saved.get("next_item") if saved.get("shards") == len(sizes) else None
    skipped = collections.Counter(saved.get("skipped", {}))
    resuming, written, consumed = last is not None, 0, 0

    def save(complete: bool) -> dict:
        now = read_sizes(out)
        s = {"out": str(out), "samples": sum(now.values()), "shards": len(now), "next_item": consumed,
             "resumed_after": sum(sizes.values()), "skipped": dict(sorted(skipped.items())), **(info or {}),
             "complete": complete}
        atomic_write_text(out / STATS, json.dumps(s, indent=1))
        return {**s, "written": written}

    bar = tqdm(total=total, desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    try:
        with ShardWriter(out, samples_per_shard, start_shard=len(sizes)) as w:
            for consumed, (key, build) in enumerate(items, 1):
                bar.update(1)
                if resuming:  # inside the complete shards: no image is read
                    if resume_at is not None and consumed < resume_at:
                        continue
                    if resume_at is not None and key != last:
                        break
                    resuming = key != last
                    continue
                try:
                    s = build()
                except Skip as e:
                    skipped[e.reason] += 1
                    continue
                w.write(s)
                written += 1
                if w.sink is None:  # a shard was just completed: its counts go with it
                    save(False)
                    bar.set_postfix(shards=w.shard, skipped=sum(skipped.values()))
    finally:
        bar.close()
    if resuming:
        raise InputError(f"{out}: its shards end with sample {last!r}, which is not where the inputs put it: the "
                         "directory holds another conversion (other inputs or options); use an empty --out")
    return save(True)


# ---------------------------------------------------------------------------- COCO captions
_COCO_EXPECTED = "a COCO captions file (captions_train2014.json style: 'images' [{id, file_name}], " \
                 "'annotations' [{image_id, caption}])"
_KARPATHY_EXPECTED = "a Karpathy split file (dataset_coco.json: 'images' [{cocoid, split, ...}])"


def karpathy_splits(path: PathLike) -> dict[int, str]:
    """cocoid -> Karpathy split (train, restval, val, test)."""
    doc = _load_json(path, _KARPATHY_EXPECTED)
    out = {}
    for i, im in enumerate(_list_field(doc, "images", path, _KARPATHY_EXPECTED)):
        _need(im, ("cocoid", "split"), f"{path}: images[{i}]", _KARPATHY_EXPECTED)
        out[int(im["cocoid"])] = im["split"]
    return out


def convert_coco(ann_json: PathLike | Sequence[PathLike], image_dir: PathLike, out_dir: PathLike,
                 karpathy_json: PathLike | None = None, splits: Sequence[str] = ("train", "restval"),
                 samples_per_shard: int = 1000, seed: int = 0, progress: bool = True) -> dict:
    """COCO captions -> one sample per (image, caption) pair, shuffled with ``seed``.

    ``ann_json``: one or more official caption files (train2014 and val2014: Karpathy's
    restval images come from val2014). With ``karpathy_json`` only images whose Karpathy
    split is in ``splits`` are kept. ``image_dir`` is searched recursively by file name.
    """
    paths = [ann_json] if isinstance(ann_json, (str, os.PathLike)) else list(ann_json)
    images: dict[int, dict] = {}
    anns: list[dict] = []
    for p in paths:
        doc = _load_json(p, _COCO_EXPECTED)
        ims = _list_field(doc, "images", p, _COCO_EXPECTED)
        an = _list_field(doc, "annotations", p, _COCO_EXPECTED)
        for i, im in enumerate(ims):
            _need(im, ("id", "file_name"), f"{p}: images[{i}]", _COCO_EXPECTED)
            images[int(im["id"])] = im
        for i, a in enumerate(an):
            _need(a, ("image_id", "caption"), f"{p}: annotations[{i}]", _COCO_EXPECTED)
            if int(a["image_id"]) not in images:
                raise InputError(f"{p}: annotations[{i}] refers to image_id {a['image_id']}, which is not in "
                                 "its 'images' list")
            anns.append({**a, "_id": a.get("id", f"{p}#{i}")})
    _check_unique((a["_id"] for a in anns), paths[0], "annotation id")

    split_of = karpathy_splits(karpathy_json) if karpathy_json else None
    kept_images: set[int] = set()
    excluded: collections.Counter = collections.Counter()
    pairs = []
    for a in anns:
        iid = int(a["image_id"])
        split = split_of.get(iid, "not_in_split_file") if split_of is not None else None
        if split_of is not None and split not in splits:
            excluded[split] += 1
            continue
        kept_images.add(iid)
        pairs.append((iid, str(a["_id"]), a, split))
    excluded_images = collections.Counter(split_of.get(i, "not_in_split_file") for i in
                                          {int(a["image_id"]) for a in anns} - kept_images) if split_of else {}
    pairs.sort(key=lambda t: (t[0], t[1]))
    random.Random(seed).shuffle(pairs)
    index = _index_files(image_dir)

    def build(iid: int, key: str, a: dict, split: str | None) -> dict:
        cap = _clean_text(a["caption"])
        if not cap:
            raise Skip("empty_caption")
        im = images[iid]
        img = image_bytes(index.get(Path(im["file_name"]).name))
        meta = {"image_id": iid, "annotation_id": a.get("id"), "file_name": im["file_name"],
                "width": im.get("width"), "height": im.get("height"), "split": split}
        return sample(key, img, cap, meta)

    items = ((f"{iid}-{_safe_key(aid)}", functools.partial(build, iid, f"{iid}-{_safe_key(aid)}", a, sp))
             for iid, aid, a, sp in pairs)
    info = {"dataset": "coco", "images": len(kept_images), "pairs": len(pairs),
            "splits": list(splits) if split_of is not None else "all (no Karpathy file)",
            "excluded_captions": dict(excluded), "excluded_images": dict(excluded_images)}
    return write_shards(items, out_dir, samples_per_shard, desc="coco", total=len(pairs), info=info,
                        progress=progress)


# ---------------------------------------------------------------------------- Visual Genome
_VG_EXPECTED = "VG region_descriptions.json: a list of {id, regions: [{region_id, image_id, phrase, x, y, " \
               "width, height}]}"
_VG_IMAGES_EXPECTED = "VG image_data.json: a list of {image_id (or id), url, width, height, coco_id}"


def convert_vg(region_json: PathLike, image_dir: PathLike, out_dir: PathLike,
               image_data_json: PathLike | None = None, karpathy_json: PathLike | None = None,
               max_regions_per_image: int | None = None, samples_per_shard: int = 1000, seed: int = 0,
               progress: bool = True) -> dict:
    """Visual Genome region descriptions -> one sample per (image, region phrase), with the
    box in the json, shuffled with ``seed``. Images are ``{image_id}.jpg`` anywhere under
    ``image_dir`` (VG_100K, VG_100K_2). With ``karpathy_json`` (needs ``image_data_json``
    for the coco ids) VG images that are COCO Karpathy val/test images are left out."""
    doc = _load_json(region_json, _VG_EXPECTED)
    if not isinstance(doc, list):
        raise InputError(f"{region_json}: a JSON {type(doc).__name__}; expected {_VG_EXPECTED}")
    image_info: dict[int, dict] = {}
    if image_data_json:
        data = _load_json(image_data_json, _VG_IMAGES_EXPECTED)
        if not isinstance(data, list):
            raise InputError(f"{image_data_json}: a JSON {type(data).__name__}; expected {_VG_IMAGES_EXPECTED}")
        for i, im in enumerate(data):
            if not isinstance(im, dict) or ("image_id" not in im and "id" not in im):
                raise InputError(f"{image_data_json}: [{i}] has no 'image_id'; expected {_VG_IMAGES_EXPECTED}")
            image_info[int(im.get("image_id", im.get("id")))] = im
    heldout: set[int] = set()
    if karpathy_json:
        if not image_data_json:
            raise InputError("VG with a Karpathy file needs image_data.json (--image-data) for the coco ids")
        held = {cid for cid, s in karpathy_splits(karpathy_json).items() if s in ("val", "test")}
        heldout = {iid for iid, im in image_info.items()
                   if im.get("coco_id") is not None and int(im["coco_id"]) in held}

    regions = []  # (image_id, region_id, region)
    excluded_images, excluded_regions = set(), 0
    for i, entry in enumerate(doc):
        where = f"{region_json}: [{i}]"
        _need(entry, ("regions",), where, _VG_EXPECTED)
        rs = []
        for j, r in enumerate(entry["regions"]):
            _need(r, ("region_id", "phrase", "x", "y", "width", "height"), f"{where}.regions[{j}]", _VG_EXPECTED)
            iid = r.get("image_id", r.get("image", entry.get("id", entry.get("image_id"))))
            if iid is None:
                raise InputError(f"{where}.regions[{j}]: no image id ('image_id' here or 'id' on the entry); "
                                 f"expected {_VG_EXPECTED}")
            rs.append((int(iid), int(r["region_id"]), r))
        if rs and rs[0][0] in heldout:
            excluded_images.add(rs[0][0])
            excluded_regions += len(rs)
            continue
        if max_regions_per_image is not None and len(rs) > max_regions_per_image:
            rs = random.Random(f"{seed}/{rs[0][0]}").sample(sorted(rs, key=lambda t: t[1]), max_regions_per_image)
        regions.extend(rs)
    _check_unique((r[1] for r in regions), region_json, "region_id")
    regions.sort(key=lambda t: (t[0], t[1]))
    random.Random(seed).shuffle(regions)
    index = _index_by_id(image_dir)

    def build(iid: int, rid: int, r: dict) -> dict:
        phrase = _clean_text(r["phrase"])
        if not phrase:
            raise Skip("empty_caption")
        img = image_bytes((index.get(iid) or [None])[0])
        im = image_info.get(iid, {})
        meta = {"image_id": iid, "region_id": rid,
                "box": {k: r[k] for k in ("x", "y", "width", "height")},
                "image_width": im.get("width"), "image_height": im.get("height"), "coco_id": im.get("coco_id")}
        return sample(f"{iid}-{rid}", img, phrase, meta)

    items = ((f"{iid}-{rid}", functools.partial(build, iid, rid, r)) for iid, rid, r in regions)
    info = {"dataset": "vg", "regions": len(regions), "images": len({r[0] for r in regions}),
            "excluded_coco_heldout_images": len(excluded_images), "excluded_regions": excluded_regions}
    return write_shards(items, out_dir, samples_per_shard, desc="vg", total=len(regions), info=info,
                        progress=progress)


# ---------------------------------------------------------------------------- img2dataset
def scan_tar(path: PathLike) -> dict:
    """Samples of a tar, grouped the way the training reader groups them (headers only).

    Returns ``{"keys": [...], "complete": [...], "error": str | None}``: ``complete`` are
    the keys with an image and a caption; after a read error the sample being read is dropped.
    """
    groups: list[tuple[str, set]] = []
    error = None
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isreg() or re.match(r"__[^/]*__($|/)", m.name):
                    continue
                key, suffix = base_plus_ext(m.name)
                if key is None:
                    continue
                if not groups or groups[-1][0] != key:
                    groups.append((key, set()))
                groups[-1][1].add(suffix.lower())
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{type(e).__name__}: {e}"
        if groups:
            groups.pop()
    complete = [k for k, s in groups if "txt" in s and s & {"jpg", "jpeg", "png", "webp"}]
    return {"keys": [k for k, _ in groups], "complete": complete, "error": error}


class _TarCursor:
    """Reads samples of consecutive shards in order, skipping forward to a requested key."""

    def __init__(self):
        self.path, self.it = None, None

    def get(self, path: Path, key: str) -> dict:
        from .pipeline import iter_raw_samples
        if path != self.path:
            self.path, self.it = path, iter_raw_samples(str(path))
        try:
            for raw in self.it:
                if raw["__key__"] == key:
                    return {"__key__": key, **{k: v for k, v in raw.items() if not k.startswith("__")}}
        except Exception:  # noqa: BLE001 - a broken tail: the scan drops it too, but be safe
            pass
        self.path = None
        raise Skip("unreadable_sample")


def convert_img2dataset(in_dir: PathLike, out_dir: PathLike | None = None, samples_per_shard: int | None = None,
                        progress: bool = True) -> dict:
    """Validate img2dataset webdataset output (CC3M, SBU) and write its ``sizes.json``;
    with ``samples_per_shard``, re-shard it into ``out_dir`` instead."""
    src = Path(in_dir)
    if not src.is_dir():
        raise InputError(f"{in_dir}: not a directory (expected img2dataset output: NNNNN.tar shards)")
    tars = sorted(p for p in src.glob("*.tar"))
    if not tars:
        raise InputError(f"{in_dir}: no .tar shards (expected img2dataset output with --output_format webdataset)")
    if samples_per_shard is not None and (out_dir is None or Path(out_dir).resolve() == src.resolve()):
        raise InputError("re-sharding (samples_per_shard) needs an output directory other than the input")

    scans = {}
    for t in tqdm(tars, desc="scan", unit="shard", disable=not progress, dynamic_ncols=True):
        scans[t] = scan_tar(t)
    bad = {t.name: s["error"] for t, s in scans.items() if s["error"]}
    mismatch = {}
    for t, s in scans.items():
        st = t.with_name(t.stem + "_stats.json")
        if st.exists():
            try:
                successes = json.loads(st.read_text()).get("successes")
            except ValueError:
                successes = None
            if successes is not None and successes != len(s["keys"]):
                mismatch[t.name] = {"stats_successes": successes, "in_tar": len(s["keys"])}
    info = {"dataset": "img2dataset", "input": str(src), "input_shards": len(tars),
            "input_samples": sum(len(s["keys"]) for s in scans.values()),
            "incomplete_samples": sum(len(s["keys"]) - len(s["complete"]) for s in scans.values()),
            "bad_shards": bad, "stats_mismatch": mismatch}
    if samples_per_shard is None:
        write_sizes(src, {t.name: len(s["keys"]) for t, s in scans.items() if not s["error"]})
        return {**info, "out": str(src), "samples": sum(len(s["keys"]) for s in scans.values() if not s["error"]),
                "shards": len(tars) - len(bad)}

    cursor = _TarCursor()
    items = ((k, functools.partial(cursor.get, t, k)) for t, s in scans.items() for k in s["complete"])
    return write_shards(items, out_dir, samples_per_shard, desc="reshard",
                        total=sum(len(s["complete"]) for s in scans.values()), info=info, progress=progress)


# ---------------------------------------------------------------------------- VQAv2
_CONTRACTIONS = dict(p.split(":") for p in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd "
    "howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've "
    "it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've "
    "mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've "
    "oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't "
    "shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've "
    "somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd "
    "someoned've:someone'd've someone'dve:someone'd've someonell:someone'll someones:someone's "
    "somethingd:something'd somethingd've:something'd've something'dve:something'd've somethingll:something'll "
    "thats:that's thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's "
    "theyd:they'd theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas "
    "wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're "
    "whats:what's whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd "
    "whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're "
    "whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've "
    "yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've "
    "youd:you'd youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've").split())
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"\.(?!\d)")  # the official "(?!<=\d)(\.)(?!\d)": its look-behind is a typo
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(ans: str) -> str:
    """The official VQA answer normalisation (vqaEval.py processPunctuation + processDigitArticle)."""
    text = str(ans).replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:  # dropped when spaced or in "1,000"-like text, else replaced by a space
        out = out.replace(p, "" if (p + " " in text or " " + p in text or _COMMA_STRIP.search(text)) else " ")
    out = _PERIOD_STRIP.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_soft_scores(answers: Sequence[str]) -> dict[str, float]:
    """Official VQA accuracy of each distinct (normalised) human answer: the mean over the
    n leave-one-out subsets of ``min(1, matches / 3)``; with 10 answers 1/2/3/4+ matches
    give 0.3/0.6/0.9/1.0."""
    n, counts = len(answers), collections.Counter(answers)
    if n < 2:
        return {a: round(min(1.0, k / 3), 4) for a, k in counts.items()}
    return {a: round((k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n, 4) for a, k in counts.items()}


def build_answer_vocab(annotations: Iterable[dict], num_answers: int = 3129) -> list[str]:
    """The ``num_answers`` most frequent normalised ``multiple_choice_answer`` (ties: alphabetical)."""
    counts = collections.Counter(normalize_answer(a["multiple_choice_answer"]) for a in annotations
                                 if a.get("multiple_choice_answer") is not None)
    counts.pop("", None)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_answers]]


_VQA_Q_EXPECTED = "VQA questions JSON: {'questions': [{image_id, question, question_id}]}"
_VQA_A_EXPECTED = "VQA annotations JSON: {'annotations': [{question_id, image_id, answers: [{answer, ...}], " \
                  "multiple_choice_answer}]}"


def convert_vqa(questions_json: PathLike, image_dir: PathLike, out_dir: PathLike,
                annotations_json: PathLike | None = None, answer_vocab: PathLike | Sequence[str] | None = None,
                num_answers: int = 3129, samples_per_shard: int = 1000, progress: bool = True) -> dict:
    """VQAv2 -> one sample per question (file order), json: question, question_id,
    answers {answer: soft score}, qtype. Without annotations (test) no answers are written.

    The answer vocabulary is ``answer_vocab`` (a list or an ``answers.json``; use train's
    for val) or, when None, built from ``annotations_json`` (train); it is written to
    ``out_dir/answers.json``. Images: COCO files under ``image_dir`` found by the numeric id
    in their name (``COCO_train2014_000000000009.jpg``).
    """
    qdoc = _load_json(questions_json, _VQA_Q_EXPECTED)
    questions = _list_field(qdoc, "questions", questions_json, _VQA_Q_EXPECTED)
    for i, q in enumerate(questions):
        _need(q, ("image_id", "question", "question_id"), f"{questions_json}: questions[{i}]", _VQA_Q_EXPECTED)
    _check_unique((q["question_id"] for q in questions), questions_json, "question_id")
    anns: dict | None = None
    if annotations_json:
        adoc = _load_json(annotations_json, _VQA_A_EXPECTED)
        alist = _list_field(adoc, "annotations", annotations_json, _VQA_A_EXPECTED)
        for i, a in enumerate(alist):
            _need(a, ("question_id", "answers"), f"{annotations_json}: annotations[{i}]", _VQA_A_EXPECTED)
            if not isinstance(a["answers"], list) or not all(isinstance(x, dict) and "answer" in x
                                                             for x in a["answers"]):
                raise InputError(f"{annotations_json}: annotations[{i}].answers is not a list of {{answer, ...}}; "
                                 f"expected {_VQA_A_EXPECTED}")
        anns = {a["question_id"]: a for a in alist}
    if answer_vocab is None and anns is not None:
        vocab = build_answer_vocab(anns.values(), num_answers)
    elif isinstance(answer_vocab, (str, os.PathLike)):
        vocab = _load_json(answer_vocab, "an answers.json: a JSON list of answer strings")
        if not isinstance(vocab, list) or not all(isinstance(a, str) for a in vocab):
            raise InputError(f"{answer_vocab}: expected a JSON list of answer strings")
    else:
        vocab = list(answer_vocab) if answer_vocab is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if vocab is not None:
        (out / "answers.json").write_text(json.dumps(vocab))

    # images: by numeric id; when train and val folders are both there, prefer the subtype's
    subtype = str(qdoc.get("data_subtype", "")).replace("test-dev", "test")
    by_id = _index_by_id(image_dir)

    def image_path(iid: int) -> Path | None:
        paths = by_id.get(iid, [])
        if len(paths) > 1:
            paths = [p for p in paths if subtype and subtype in p.name] or paths
        return paths[0] if paths else None

    vocab_set = set(vocab or ())
    metas, no_ann, unanswerable = [], 0, 0
    for q in questions:
        meta = {"question": q["question"], "question_id": q["question_id"], "image_id": q["image_id"]}
        if anns is not None:
            a = anns.get(q["question_id"])
            if a is None:
                no_ann += 1
                continue
            scores = vqa_soft_scores([normalize_answer(x["answer"]) for x in a["answers"]])
            scores.pop("", None)
            meta.update(answers=scores, qtype=a.get("answer_type", ""), question_type=a.get("question_type"),
                        multiple_choice_answer=normalize_answer(a.get("multiple_choice_answer", "")))
            unanswerable += not (vocab_set & set(scores))
        metas.append(meta)

    def build(meta: dict) -> dict:
        text = _clean_text(meta["question"])
        if not text:
            raise Skip("empty_question")
        return sample(str(meta["question_id"]), image_bytes(image_path(int(meta["image_id"]))), text, meta)

    items = ((str(m["question_id"]), functools.partial(build, m)) for m in metas)
    info = {"dataset": "vqa", "questions": len(metas), "answers": len(vocab) if vocab is not None else None,
            "questions_without_annotation": no_ann, "no_answer_in_vocab": unanswerable if anns is not None else None}
    return write_shards(items, out, samples_per_shard, desc="vqa", total=len(metas), info=info, progress=progress)


# ---------------------------------------------------------------------------- NLVR2
_NLVR2_EXPECTED = 'one NLVR2 example per line: {"identifier": "train-10171-0-0", "sentence": ..., "label": "True"}'


def convert_nlvr2(data_jsonl: PathLike, image_dir: PathLike, out_dir: PathLike, samples_per_shard: int = 1000,
                  progress: bool = True) -> dict:
    """NLVR2 -> one sample per example (file order): ``jpg`` = left image (``...-img0.png``),
    ``image2.jpg`` = right image (``-img1.png``), both re-encoded to JPEG; json: sentence,
    label (bool; null for an unlabeled file), identifier. Images are found by file name
    anywhere under ``image_dir`` (the train images sit in numbered subfolders)."""
    rows = _read_jsonl(data_jsonl, _NLVR2_EXPECTED)
    examples = []
    for n, ex in rows:
        where = f"{data_jsonl}:{n}"
        _need(ex, ("identifier", "sentence"), where, _NLVR2_EXPECTED)
        ident = str(ex["identifier"])
        if ident.count("-") < 2:
            raise InputError(f"{where}: identifier {ident!r} is not like 'train-10171-0-0'")
        label = ex.get("label")
        if isinstance(label, str) and label.lower() in ("true", "false"):
            label = label.lower() == "true"
        elif label is not None and not isinstance(label, bool):
            raise InputError(f"{where}: label {label!r} is not 'True' or 'False'")
        examples.append((ident, ex, label))
    _check_unique((e[0] for e in examples), data_jsonl, "identifier")
    index = _index_files(image_dir)

    def build(ident: str, ex: dict, label: bool | None) -> dict:
        pair = ident.rsplit("-", 1)[0]
        left, right = f"{pair}-img0.png", f"{pair}-img1.png"
        img0, img1 = image_bytes(index.get(left)), image_bytes(index.get(right))
        text = _clean_text(ex["sentence"])
        if not text:
            raise Skip("empty_sentence")
        meta = {"sentence": text, "label": label, "identifier": ident, "left_image": left, "right_image": right}
        return sample(_safe_key(ident), img0, text, meta, **{"image2.jpg": img1})

    items = ((_safe_key(e[0]), functools.partial(build, *e)) for e in examples)
    info = {"dataset": "nlvr2", "examples": len(examples), "unlabeled": sum(e[2] is None for e in examples)}
    return write_shards(items, out_dir, samples_per_shard, desc="nlvr2", total=len(examples), info=info,
                        progress=progress)


# ---------------------------------------------------------------------------- SNLI-VE
_SNLI_EXPECTED = 'one SNLI-VE example per line: {"Flickr30K_ID": ..., "sentence2": hypothesis, ' \
                 '"gold_label": "entailment"|"neutral"|"contradiction", "pairID": ...}'


def convert_snli_ve(data_jsonl: PathLike, image_dir: PathLike, out_dir: PathLike, samples_per_shard: int = 1000,
                    progress: bool = True) -> dict:
    """SNLI-VE -> one sample per (image, hypothesis), file order; json: hypothesis, label,
    premise, pair_id, flickr30k_id. Images ``{Flickr30K_ID}.jpg`` under ``image_dir``.
    Examples whose gold label is not one of the three classes are skipped (``bad_label``)."""
    rows = _read_jsonl(data_jsonl, _SNLI_EXPECTED)
    examples = []
    for n, ex in rows:
        _need(ex, ("Flickr30K_ID", "sentence2", "gold_label"), f"{data_jsonl}:{n}", _SNLI_EXPECTED)
        examples.append((_safe_key(ex.get("pairID", f"line{n:09d}")), ex))
    _check_unique((e[0] for e in examples), data_jsonl, "pairID")
    index = _index_files(image_dir)

    def build(key: str, ex: dict) -> dict:
        label = ex["gold_label"]
        if label not in SNLI_LABELS:
            raise Skip("bad_label")
        text = _clean_text(ex["sentence2"])
        if not text:
            raise Skip("empty_hypothesis")
        fid = str(ex["Flickr30K_ID"])
        img = image_bytes(index.get(fid if fid.lower().endswith(".jpg") else f"{fid}.jpg"))
        meta = {"hypothesis": text, "label": label, "qtype": label, "premise": ex.get("sentence1"),
                "pair_id": ex.get("pairID"), "flickr30k_id": fid}
        return sample(key, img, text, meta)

    items = ((k, functools.partial(build, k, ex)) for k, ex in examples)
    info = {"dataset": "snli_ve", "examples": len(examples)}
    return write_shards(items, out_dir, samples_per_shard, desc="snli_ve", total=len(examples), info=info,
                        progress=progress)
