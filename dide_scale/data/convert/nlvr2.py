"""NLVR2 JSON lines + image pairs -> one sample per example."""
from __future__ import annotations

import functools

from ..shards import sample
from .common import (
    InputError,
    PathLike,
    Skip,
    _check_unique,
    _clean_text,
    _index_files,
    _need,
    _read_jsonl,
    _safe_key,
    image_bytes,
    write_shards,
)

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
