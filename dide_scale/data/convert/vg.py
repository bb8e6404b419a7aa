"""Visual Genome region descriptions -> one sample per (image, region phrase)."""
from __future__ import annotations

import functools
import random

from ..shards import sample
from .coco import karpathy_splits
from .common import (
    InputError,
    PathLike,
    Skip,
    _check_unique,
    _clean_text,
    _index_by_id,
    _load_json,
    _need,
    image_bytes,
    write_shards,
)

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
