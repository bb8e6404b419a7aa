"""COCO captions (+ Karpathy splits) -> one sample per (image, caption) pair; each sample's
json also lists every caption of its image (``references``), so a captioning evaluation has
an image's five references whichever of its samples it reads."""
from __future__ import annotations

import collections
import functools
import os
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
                 samples_per_shard: int = 1000, seed: int = 0, progress: bool = True,
                 order: str | None = None) -> dict:
    """COCO captions -> one sample per (image, caption) pair, shuffled with ``seed`` (or, for
    evaluation splits, each image's captions together: ``common.arrange_pairs``).

    ``ann_json``: one or more official caption files (train2014 and val2014: Karpathy's
    restval images come from val2014). With ``karpathy_json`` only images whose Karpathy
    split is in ``splits`` are kept (``("test",)``: the 5K retrieval test split).
    ``image_dir`` is searched recursively by file name.
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
    references = collections.defaultdict(list)  # every caption of an image, in the order of the pairs
    for iid, _, a, _ in pairs:
        if _clean_text(a["caption"]):
            references[iid].append(_clean_text(a["caption"]))
    pairs, order = arrange_pairs(pairs, order, splits if split_of is not None else None, seed)
    index = _index_files(image_dir)

    def build(iid: int, key: str, a: dict, split: str | None) -> dict:
        cap = _clean_text(a["caption"])
        if not cap:
            raise Skip("empty_caption")
        im = images[iid]
        img = image_bytes(index.get(Path(im["file_name"]).name))
        meta = {"image_id": iid, "annotation_id": a.get("id"), "file_name": im["file_name"],
                "width": im.get("width"), "height": im.get("height"), "split": split,
                "references": references[iid]}
        return sample(key, img, cap, meta)

    items = ((f"{iid}-{_safe_key(aid)}", functools.partial(build, iid, f"{iid}-{_safe_key(aid)}", a, sp))
             for iid, aid, a, sp in pairs)
    info = {"dataset": "coco", "images": len(kept_images), "pairs": len(pairs),
            "splits": list(splits) if split_of is not None else "all (no Karpathy file)", "order": order,
            "excluded_captions": dict(excluded), "excluded_images": dict(excluded_images)}
    return write_shards(items, out_dir, samples_per_shard, desc="coco", total=len(pairs), info=info,
                        progress=progress)
