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


def test_prototype_decode_matches_shipped(bench, tmp_path):
    from dide_scale.data.pipeline import expand_sources, iter_raw_samples
    from dide_scale.data.transforms import decode_image
    info = bench.build_shards(str(tmp_path), n=6, per_shard=3, quality=90, subsampling="420")
    assert info["images"] == 6 and 1.0 < info["bpp"] < 4.0
    raws = [r for s in expand_sources(info["pattern"]) for u in s.urls for r in iter_raw_samples(u)]
    assert len(raws) == 6 and all(r["txt"] for r in raws)
    for raw in raws:
        ref = decode_image(raw["jpg"], (48, 80), 40_000_000)
        for tv in (False, True):
            out = bench.decode_image_proto(raw["jpg"], (48, 80), 40_000_000, tv_decode=tv)
            assert out.shape == ref.shape == (3, 48, 80) and out.is_contiguous()
            assert (out.int() - ref.int()).abs().max() <= 1  # torch's uint8 AA bilinear ~ PIL's


@pytest.mark.skipif(importlib.util.find_spec("open_clip_train") is None, reason="open-clip-torch not installed")
def test_tiny_run(bench, tmp_path):
    out = tmp_path / "r.md"
    rc = bench.main(["--images", "8", "--per-shard", "4", "--workers", "0", "--repeats", "1", "--warmup", "0",
                     "--window", "0.05", "--size", "32", "--model-size", "0", "0", "--batch-size", "4",
                     "--out", str(out)])
    text = out.read_text()
    assert rc == 0 and "| ours as shipped | 32x32 | 0 |" in text and "| OpenCLIP" in text
