"""Shards in the img2dataset layout: numbered ``.tar`` files holding ``{key}.jpg``,
``{key}.txt``, ``{key}.json`` (tasks add members such as ``{key}.image2.jpg``), plus a
``sizes.json`` mapping shard file name -> sample count.

The writer is resumable: each shard is written to ``NAME.tmp`` and renamed when complete,
so an interrupted conversion leaves only complete shards, and ``done_shards`` tells a
converter where to restart.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import webdataset as wds

from ..fsutil import atomic_write_text

SIZES = "sizes.json"


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
        write_sizes(self.out, self.sizes)
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


def read_sizes(d: str | os.PathLike) -> dict[str, int]:
    p = Path(d) / SIZES
    return json.loads(p.read_text()) if p.exists() else {}


def write_sizes(d: str | os.PathLike, sizes: dict[str, int]) -> None:
    atomic_write_text(Path(d) / SIZES, json.dumps(dict(sorted(sizes.items())), indent=1))


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
