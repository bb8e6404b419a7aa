"""What every converter shares: input checks, image bytes, and the resumable shard driver."""
from __future__ import annotations

import collections
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

from ...fsutil import atomic_write_text
from ..shards import ShardWriter, jpeg_bytes, read_sizes

STATS = "convert_stats.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

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


PAIR_ORDERS = ("shuffle", "image")
TRAINING_SPLITS = ("train", "restval")


def arrange_pairs(pairs: list, order: str | None, splits: Sequence[str] | None, seed: int) -> tuple[list, str]:
    """Caption pairs, sorted so that each image's captions are together, put in the order they
    are written: 'shuffle' (seeded; an image's captions spread over the shards, so in-batch
    ITM/ITC negatives are not the same image) or 'image' (each image's captions together, so a
    retrieval evaluation split over ranks embeds each image on one rank). ``None``: 'shuffle'
    when a training split is kept (or no split file was given), else 'image'.  Returns
    (pairs, the order used)."""
    if order is None:
        order = "shuffle" if splits is None or set(splits) & set(TRAINING_SPLITS) else "image"
    if order not in PAIR_ORDERS:
        raise InputError(f"order={order!r}: expected one of {', '.join(PAIR_ORDERS)}")
    if order == "shuffle":
        pairs = list(pairs)
        random.Random(seed).shuffle(pairs)
    return pairs, order


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


