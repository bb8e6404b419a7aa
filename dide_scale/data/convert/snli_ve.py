"""SNLI-VE JSON lines over Flickr30K -> one sample per hypothesis."""
from __future__ import annotations

import functools

from ..shards import SNLI_VE_NAMES, sample
from .common import (
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
        if label not in SNLI_VE_NAMES:
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
