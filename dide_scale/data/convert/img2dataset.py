"""img2dataset output (CC3M, SBU): validate and write sizes.json, or re-shard."""
from __future__ import annotations

import functools
import json
from pathlib import Path

from tqdm import tqdm

from ..shards import sample_index, write_sizes
from .common import InputError, PathLike, Skip, write_shards


def scan_tar(path: PathLike) -> dict:
    """Samples of a tar, grouped the way the training reader groups them (headers only).

    Returns ``{"keys": [...], "complete": [...], "offsets": [...], "error": str | None}``:
    ``complete`` are the keys with an image and a caption, ``offsets`` where each sample
    starts; after a read error the sample being read is dropped.
    """
    idx = sample_index(path)
    complete = [k for k, s in zip(idx["keys"], idx["suffixes"]) if "txt" in s and s & {"jpg", "jpeg", "png", "webp"}]
    return {"keys": idx["keys"], "complete": complete, "offsets": idx["offsets"], "error": idx["error"]}


class _TarCursor:
    """Reads samples of consecutive shards in order, skipping forward to a requested key."""

    def __init__(self):
        self.path, self.it = None, None

    def get(self, path: Path, key: str) -> dict:
        from ..pipeline import iter_raw_samples
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
        good = {t.name: s for t, s in scans.items() if not s["error"]}
        write_sizes(src, {k: len(s["keys"]) for k, s in good.items()}, {k: s["offsets"] for k, s in good.items()})
        return {**info, "out": str(src), "samples": sum(len(s["keys"]) for s in scans.values() if not s["error"]),
                "shards": len(tars) - len(bad)}

    cursor = _TarCursor()
    items = ((k, functools.partial(cursor.get, t, k)) for t, s in scans.items() for k in s["complete"])
    return write_shards(items, out_dir, samples_per_shard, desc="reshard",
                        total=sum(len(s["complete"]) for s in scans.values()), info=info, progress=progress)
