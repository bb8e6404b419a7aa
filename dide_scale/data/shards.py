"""Shards in the img2dataset layout: numbered ``.tar`` files holding ``{key}.jpg``,
``{key}.txt``, ``{key}.json`` (tasks add members such as ``{key}.image2.jpg``), plus a
``sizes.json`` mapping shard file name -> sample count, and under its ``__offsets__`` key
shard file name -> the byte offset of each sample's first tar header, where a reader can
start that sample with a seek or a range request instead of reading the shard from its
start (shards without offsets are read through, as before).

The writer is resumable: each shard is written to ``NAME.tmp`` and renamed when complete,
so an interrupted conversion leaves only complete shards, and ``done_shards`` tells a
converter where to restart.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from ..fsutil import atomic_write_text

SIZES = "sizes.json"
# The label words of the SNLI-VE and NLVR2 shards (``{key}.json`` "label"), in the order of their
# integer labels: the one home of these orders (converters, decoders, the demo, labels.py).
SNLI_VE_NAMES = ("entailment", "neutral", "contradiction")
NLVR2_NAMES = ("False", "True")
OFFSETS = "__offsets__"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset skips these members


def sample_index(path: str | os.PathLike) -> dict:
    """The samples of a tar as the training reader groups them (consecutive regular members
    with one key), from its headers alone: ``{"keys", "suffixes", "offsets", "error"}``, where
    ``offsets[i]`` is where sample i's first header starts (its extended header, if any).
    After a read error the sample being read is dropped and ``error`` says why."""
    keys: list[str] = []
    suffixes: list[set] = []
    offsets: list[int] = []
    error = None
    try:
        with tarfile.open(path) as tf:
            for m in tf:
                if not m.isreg() or _META.match(m.name):
                    continue
                key, suffix = base_plus_ext(m.name)
                if key is None:
                    continue
                if not keys or keys[-1] != key:
                    keys.append(key)
                    suffixes.append(set())
                    offsets.append(m.offset)
                suffixes[-1].add(suffix.lower())
    except (tarfile.TarError, OSError, EOFError) as e:
        error = f"{type(e).__name__}: {e}"
        if keys:
            keys.pop(), suffixes.pop(), offsets.pop()
    return {"keys": keys, "suffixes": suffixes, "offsets": offsets, "error": error}


class ShardWriter:
    """Write samples (dicts of member-suffix -> bytes/str/dict) into numbered shards."""

    def __init__(self, out_dir: str | os.PathLike, samples_per_shard: int = 1000, start_shard: int = 0):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.per_shard = samples_per_shard
        self.shard = start_shard
        self.count = 0
        self.sink: wds.TarWriter | None = None
        self.sizes = read_sizes(self.out)
        self.offsets = read_offsets(self.out)

    def _open(self) -> None:
        self._tmp = self.out / f"{self.shard:05d}.tar.tmp"
        self.sink = wds.TarWriter(str(self._tmp))
        self.count = 0

    def _close(self) -> None:
        if self.sink is None:
            return
        self.sink.close()
        name = f"{self.shard:05d}.tar"
        os.replace(self._tmp, self.out / name)
        self.sizes[name] = self.count
        index = sample_index(self.out / name)
        if index["error"] is None and len(index["offsets"]) == self.count:
            self.offsets[name] = index["offsets"]
        write_sizes(self.out, self.sizes, self.offsets)
        self.sink = None
        self.shard += 1

    def write(self, sample: dict) -> None:
        """``sample`` needs ``__key__``; other entries are tar members by suffix."""
        if self.sink is None:
            self._open()
        self.sink.write(sample)
        self.count += 1
        if self.count >= self.per_shard:
            self._close()

    def close(self) -> None:
        self._close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._close()
        elif self.sink is not None:  # leave no partial shard behind
            self.sink.close()
            self._tmp.unlink(missing_ok=True)


def split_sizes(doc: dict | None) -> tuple[dict[str, int], dict[str, list[int]]]:
    """A parsed sizes.json -> (sample counts, per-sample byte offsets), each by shard name.
    Offsets whose count disagrees with the shard's sample count are left out."""
    if not isinstance(doc, dict):
        return {}, {}
    sizes = {k: int(v) for k, v in doc.items() if not k.startswith("__")}
    offsets = {k: v for k, v in (doc.get(OFFSETS) or {}).items() if k in sizes and len(v) == sizes[k]}
    return sizes, offsets


def _read_doc(d: str | os.PathLike) -> dict:
    p = Path(d) / SIZES
    return json.loads(p.read_text()) if p.exists() else {}


def read_sizes(d: str | os.PathLike) -> dict[str, int]:
    return split_sizes(_read_doc(d))[0]


def read_offsets(d: str | os.PathLike) -> dict[str, list[int]]:
    return split_sizes(_read_doc(d))[1]


def write_sizes(d: str | os.PathLike, sizes: dict[str, int], offsets: dict[str, list[int]] | None = None) -> None:
    """Write ``d/sizes.json``: the counts, and the offsets of the shards that have them."""
    doc: dict = dict(sorted(sizes.items()))
    kept = {k: list(v) for k, v in sorted((offsets or {}).items()) if k in sizes and len(v) == sizes[k]}
    if kept:
        doc[OFFSETS] = kept
    atomic_write_text(Path(d) / SIZES, json.dumps(doc, indent=1) if not kept else _compact(doc))


def _compact(doc: dict) -> str:
    """One line per shard: the counts as before, each shard's offsets on one line."""
    lines = [f" {json.dumps(k)}: {v}" for k, v in doc.items() if k != OFFSETS]
    offs = [f"  {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in doc[OFFSETS].items()]
    return "{\n" + ",\n".join(lines + [f" {json.dumps(OFFSETS)}: {{\n" + ",\n".join(offs) + "\n }"]) + "\n}"


def done_shards(d: str | os.PathLike) -> int:
    """Complete shards already written (what a resumed converter skips)."""
    return len(read_sizes(d))


def shard_pattern(d: str | os.PathLike) -> str:
    """Brace pattern covering the complete shards of a directory: ``d/{00000..00009}.tar``."""
    names = sorted(read_sizes(d))
    if not names:
        raise FileNotFoundError(f"{d}: no complete shards ({SIZES} missing or empty)")
    first, last = names[0][:-4], names[-1][:-4]
    return str(Path(d) / (f"{first}.tar" if first == last else f"{{{first}..{last}}}.tar"))


def suggest_pattern(d: str | os.PathLike) -> str:
    """A brace pattern naming the shards of folder ``d``, for error messages: from its
    sizes.json, else from its numbered ``.tar`` files when they run without gaps, else a
    placeholder range."""
    d = Path(d)
    for below in ("", "*/", "*/*/"):  # a folder above the shard folders: the first one below it
        found = sorted(d.glob(below + SIZES)) if d.is_dir() else []
        if found:
            try:
                return shard_pattern(found[0].parent)
            except FileNotFoundError:
                break
    stems = sorted(p.name[:-4] for p in d.glob("*.tar")) if d.is_dir() else []
    numbered = stems and all(s.isdigit() and len(s) == len(stems[0]) for s in stems)
    if numbered and int(stems[-1]) - int(stems[0]) + 1 == len(stems):
        return str(d / (f"{stems[0]}.tar" if len(stems) == 1 else f"{{{stems[0]}..{stems[-1]}}}.tar"))
    return str(d / "{00000..00099}.tar")


def jpeg_bytes(img, quality: int = 95) -> bytes:
    """PIL image -> JPEG bytes (4:4:4, so thin coloured shapes keep their colour)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def sample(key: str, image: bytes, caption: str, meta: dict | None = None, **extra: bytes) -> dict:
    """An img2dataset-style sample dict for ShardWriter."""
    out = {"__key__": key, "jpg": image, "txt": caption,
           "json": json.dumps({"key": key, "caption": caption, **(meta or {})}).encode()}
    out.update(extra)
    return out
