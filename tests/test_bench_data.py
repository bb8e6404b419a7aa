"""Smoke test of tools/bench_data.py: synthetic shards, the prototype decoder, a tiny run."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, TOOLS)
    try:
        import bench_data
        yield bench_data
    finally:
        sys.path.remove(TOOLS)


def test_synthetic_shards_decode_with_every_variant(bench, tmp_path):
    from dide_scale.data.pipeline import expand_sources, iter_raw_samples
    from dide_scale.data.transforms import Geometry, decode_image
    info = bench.build_shards(str(tmp_path), n=6, per_shard=3, quality=90, subsampling="420")
    assert info["images"] == 6 and 1.0 < info["bpp"] < 4.0
    raws = [r for s in expand_sources(info["pattern"]) for u in s.urls for r in iter_raw_samples(u)]
    assert len(raws) == 6 and all(r["txt"] for r in raws)
    geo = Geometry("vilt", 96, 160, 32)
    for raw in raws:
        full = decode_image(raw["jpg"], geo, 40_000_000)
        draft = decode_image(raw["jpg"], geo, 40_000_000, draft=True)
        assert full.shape == draft.shape and min(full.shape[1:]) <= 96 and max(full.shape[1:]) <= 160
        assert (full.float() - draft.float()).abs().mean() < 12  # a reduced-scale decode, close but not equal


@pytest.mark.skipif(importlib.util.find_spec("open_clip_train") is None, reason="open-clip-torch not installed")
def test_tiny_run(bench, tmp_path):
    out = tmp_path / "r.md"
    rc = bench.main(["--images", "8", "--per-shard", "4", "--workers", "0", "--repeats", "1", "--warmup", "0",
                     "--window", "0.05", "--size", "32", "--batch-size", "4", "--out", str(out)])
    text = out.read_text()
    assert rc == 0 and "| ours as shipped" in text and "| OpenCLIP" in text and "jpeg_draft" in text
