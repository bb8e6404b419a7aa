"""Flickr30K (Karpathy's split file + the image folder) -> one sample per (image, caption)."""
from __future__ import annotations

import collections
import functools
from pathlib import Path
from typing import Sequence

from ..shards import sample
from .common import (
    InputError,
    PathLike,
    Skip,
    _check_unique,
    _clean_text,
    _index_files,
    _list_field,
    _load_json,
    _need,
    _safe_key,
    arrange_pairs,
    image_bytes,
    write_shards,
)

_EXPECTED = ("a Karpathy split file (dataset_flickr30k.json: 'images' [{filename, split, sentences: "
             "[{raw, ...}], ...}])")


def read_karpathy_captions(path: PathLike) -> list[tuple[dict, list[dict]]]:
    """(image entry, its sentences) of every image of a Karpathy split file, in file order."""
    doc = _load_json(path, _EXPECTED)
    out = []
    for i, im in enumerate(_list_field(doc, "images", path, _EXPECTED)):
        where = f"{path}: images[{i}]"
        _need(im, ("filename", "split", "sentences"), where, _EXPECTED)
        if not isinstance(im["sentences"], list):
            raise InputError(f"{where}: 'sentences' is a JSON {type(im['sentences']).__name__}; expected {_EXPECTED}")
        for c, s in enumerate(im["sentences"]):
            _need(s, ("raw",), f"{where}.sentences[{c}]", _EXPECTED)
        out.append((im, im["sentences"]))
    _check_unique((_safe_key(Path(im["filename"]).stem) for im, _ in out), path, "image file name (as a sample key)")
    return out


def convert_flickr30k(karpathy_json: PathLike, image_dir: PathLike, out_dir: PathLike,
                      splits: Sequence[str] = ("train",), samples_per_shard: int = 1000, seed: int = 0,
                      progress: bool = True, order: str | None = None) -> dict:
    """Every caption of every image whose Karpathy split is in ``splits`` (29,000 train, 1,014
    val, 1,000 test images; five captions each), one sample per (image, caption): the key is
    ``{image stem}-{caption index}``, ``image_id`` the file's stem (so the retrieval
    evaluation knows an image's captions), the caption Karpathy's ``raw`` text with its
    whitespace cleaned.  Pairs are shuffled with ``seed`` for training splits and kept image
    by image for evaluation splits (``common.arrange_pairs``). ``image_dir`` is searched
    recursively by file name."""
    keep = set(splits)
    pairs, kept_images = [], set()
    excluded_captions, excluded_images = collections.Counter(), collections.Counter()
    for n, (im, sentences) in enumerate(read_karpathy_captions(karpathy_json)):
        split = str(im["split"])
        if split not in keep:
            excluded_images[split] += 1
            excluded_captions[split] += len(sentences)
            continue
        kept_images.add(im["filename"])
        pairs += [(n, c, im, s) for c, s in enumerate(sentences)]
    pairs, order = arrange_pairs(pairs, order, splits, seed)
    index = _index_files(image_dir)

    def build(key: str, c: int, im: dict, s: dict) -> dict:
        cap = _clean_text(s["raw"])
        if not cap:
            raise Skip("empty_caption")
        img = image_bytes(index.get(Path(im["filename"]).name))
        meta = {"image_id": Path(im["filename"]).stem, "file_name": im["filename"], "split": im["split"],
                "caption_index": c, "imgid": im.get("imgid"), "sentid": s.get("sentid")}
        return sample(key, img, cap, meta)

    def key(im: dict, c: int) -> str:
        return f"{_safe_key(Path(im['filename']).stem)}-{c}"
    items = ((key(im, c), functools.partial(build, key(im, c), c, im, s)) for _, c, im, s in pairs)
    info = {"dataset": "flickr30k", "images": len(kept_images), "pairs": len(pairs), "splits": list(splits),
            "order": order, "excluded_captions": dict(excluded_captions), "excluded_images": dict(excluded_images)}
    return write_shards(items, out_dir, samples_per_shard, desc="flickr30k", total=len(pairs), info=info,
                        progress=progress)
