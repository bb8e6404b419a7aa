"""The demo generator, the shard layout, exact resume and bad-sample accounting."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from dide_scale.data.demo import ANSWERS, generate_split
from dide_scale.data.pipeline import ResumableLoader, WdsBatches, expand_sources, iter_raw_samples
from dide_scale.data.shards import ShardWriter, read_offsets, read_sizes, sample_index, shard_pattern
from dide_scale.data.transforms import Collate, Geometry, SampleDecoder

GEO = Geometry("vilt", 32, 32, 8)  # the demo's 32x32 scenes: a 4x4 patch grid


def make_loader(pattern, workers=0, bs=4, task="vqa", resampled=True, seed=0, rank=0, world=1):
    dec = SampleDecoder(task, GEO, 40_000_000, list(ANSWERS) if task == "vqa" else None)
    ds = WdsBatches(expand_sources(pattern), dec, Collate("builtin:demo", 16, GEO.max_patches), bs, seed, rank, world,
                    resampled=resampled, open_shards=2, num_workers=workers)
    return ResumableLoader(ds)


def take(loader, n):
    out = []
    for b in loader:
        out.append(b["keys"])
        if len(out) == n:
            break
    return out


def test_demo_is_reproducible_and_in_img2dataset_layout(tmp_path):
    a = generate_split(tmp_path / "a", 30, 5, samples_per_shard=16)
    b = generate_split(tmp_path / "b", 30, 5, samples_per_shard=16)
    assert read_sizes(a) == {"00000.tar": 16, "00001.tar": 14}
    ra, rb = list(iter_raw_samples(str(a / "00001.tar"))), list(iter_raw_samples(str(b / "00001.tar")))
    assert [r["jpg"] for r in ra] == [r["jpg"] for r in rb]
    meta = json.loads(ra[0]["json"])
    assert {"question", "answers", "qtype", "caption"} <= set(meta)
    assert ra[0]["txt"].decode() == meta["caption"]
    assert shard_pattern(a).endswith("{00000..00001}.tar")


@pytest.mark.parametrize("task", ["nlvr2", "snli_ve"])
def test_demo_task_shards_decode(tmp_path, task):
    d = generate_split(tmp_path / task, 12, 0, task, samples_per_shard=12)
    batch = next(iter(make_loader(f"{d}/00000.tar", task=task)))
    assert batch["patches"].shape == (4, 16, 8 * 8 * 3) and batch["patch_valid"].all()
    assert batch["labels"].dtype == torch.long
    if task == "nlvr2":
        assert batch["patches2"].shape == (4, 16, 8 * 8 * 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_exactly_the_uninterrupted_stream(demo_shards, workers):
    pattern = f"{demo_shards}/train/{{00000..00003}}.tar"
    full = take(make_loader(pattern, workers), 14)
    first = make_loader(pattern, workers)
    head = take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = make_loader(pattern, workers)
    resumed.load_state_dict(state)
    tail = take(resumed, 9)
    assert head + tail == full


def test_ranks_and_workers_see_different_streams(demo_shards):
    pattern = f"{demo_shards}/train/{{00000..00003}}.tar"
    r0 = take(make_loader(pattern, rank=0, world=2), 3)
    r1 = take(make_loader(pattern, rank=1, world=2), 3)
    assert r0 != r1
    assert take(make_loader(pattern, seed=1), 3) != r0


def test_epoch_mode_reads_every_sample_once(demo_shards):
    loader = make_loader(f"{demo_shards}/train/{{00000..00003}}.tar", workers=2, resampled=False)
    keys = [k for b in loader for k in b["keys"]]
    assert len(keys) == len(set(keys)) == 256


def test_weighted_sources_mix(demo_shards, tmp_path):
    other = generate_split(tmp_path / "other", 64, 9, samples_per_shard=64)
    dec = SampleDecoder("vqa", GEO, 40_000_000, list(ANSWERS))
    sources = expand_sources(f"{demo_shards}/train/{{00000..00003}}.tar::{other}/00000.tar", [1.0, 3.0])
    collate = Collate("builtin:demo", 16, GEO.max_patches)
    loader = ResumableLoader(WdsBatches(sources, dec, collate, 8, 0, open_shards=1))
    take(loader, 200)  # ~25 shard picks
    _, seen, _ = loader.counters()
    assert seen["other"] > seen["train"] > 0


def test_missing_shards_fail_with_the_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        expand_sources(f"{tmp_path}/{{000..003}}.tar")


def _jpeg(w, h, color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG")
    return buf.getvalue()


def salted_shards(d):
    """Two shards with every kind of bad sample, and a truncated third shard."""
    good = _jpeg(32, 32)
    q = json.dumps({"question": "is there a red square ?", "answers": {"yes": 1.0}, "qtype": "exist"}).encode()
    bad = {
        "corrupt_image": {"jpg": b"\x89PNG\r\n not really an image", "json": q},
        "truncated_jpeg": {"jpg": good[: len(good) // 2], "json": q},
        "missing_question": {"jpg": good, "json": json.dumps({"answers": {}}).encode()},
        "empty_caption": {"jpg": good, "json": json.dumps({"question": "   "}).encode()},
        "non_utf8_caption": {"jpg": good, "json": b'{"question": "\xff\xfe"}'},
        "oversized_image": {"jpg": _jpeg(3000, 3000), "json": q},
        "missing_image": {"json": q},
    }
    n_good = 0
    with ShardWriter(d, samples_per_shard=20) as w:
        for rep in range(2):
            for i in range(12):
                w.write({"__key__": f"g{rep}_{i}", "jpg": good, "json": q})
                n_good += 1
            for name, members in bad.items():
                w.write({"__key__": f"b{rep}_{name}", **members})
    # a truncated tar: a real shard cut in the middle of a member
    full = d / "00000.tar"
    (d / "00099.tar").write_bytes(full.read_bytes()[: 7000])
    return n_good, bad


def test_bad_samples_are_skipped_and_counted(tmp_path):
    n_good, bad = salted_shards(tmp_path)
    dec = SampleDecoder("vqa", GEO, 1_000_000, list(ANSWERS))
    pattern = f"{tmp_path}/{{00000..00001}}.tar::{tmp_path}/00099.tar"
    ds = WdsBatches(expand_sources(pattern), dec, Collate("builtin:demo", 16, GEO.max_patches), 1, 0, resampled=False,
                    open_shards=2, num_workers=0, drop_last=False)
    loader = ResumableLoader(ds)
    got = [b for b in loader]
    skipped, seen, _ = loader.counters()
    # the truncated tar yields the samples before the cut, then is counted and dropped
    assert skipped.pop("unreadable_shard") == 1
    truncated_good = sum(seen.values()) - n_good
    assert truncated_good >= 0 and len(got) == sum(seen.values())
    reasons = {"corrupt_image": 2, "truncated_image": 2, "missing_question": 2, "empty_caption": 2,
               "non_utf8_caption": 2, "oversized_image": 2, "missing_image": 2}
    for reason, n in reasons.items():
        assert skipped.get(reason, 0) >= n, (reason, skipped)
    assert sum(skipped.values()) >= sum(reasons.values())


def test_tar_members_survive_writer(tmp_path):
    with ShardWriter(tmp_path, 10) as w:
        w.write({"__key__": "k1", "jpg": _jpeg(8, 8), "txt": "hello", "image2.jpg": _jpeg(8, 8)})
    with tarfile.open(tmp_path / "00000.tar") as t:
        assert sorted(t.getnames()) == ["k1.image2.jpg", "k1.jpg", "k1.txt"]


def test_demo_tokenizer_knows_every_demo_word(tmp_path):
    """A word-piece vocabulary that silently failed to load maps everything to [UNK]."""
    from dide_scale.data.transforms import load_tokenizer
    tok = load_tokenizer("builtin:demo")
    d = generate_split(tmp_path / "v", 50, 3, samples_per_shard=50)
    texts = []
    for raw in iter_raw_samples(str(d / "00000.tar")):
        meta = json.loads(raw["json"])
        texts += [meta["question"], meta["caption"]]
    ids = tok(texts)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)


def test_epoch_mode_training_repeats_with_a_new_order_and_resumes(demo_shards):
    pattern = f"{demo_shards}/train/{{00000..00003}}.tar"

    def loader():
        dec = SampleDecoder("vqa", GEO, 40_000_000, list(ANSWERS))
        ds = WdsBatches(expand_sources(pattern), dec, Collate("builtin:demo", 16, GEO.max_patches), 32, 0,
                        resampled=False,
                        open_shards=2, num_workers=0)
        return ResumableLoader(ds, repeat=True)
    full = take(loader(), 20)  # 8 batches per epoch
    ep0, ep1 = sorted(k for b in full[:8] for k in b), sorted(k for b in full[8:16] for k in b)
    assert ep0 == ep1 and full[:8] != full[8:16]  # every sample once per epoch, new order
    first = loader()
    head = take(first, 11)
    resumed = loader()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + take(resumed, 9) == full


def test_sample_offsets_start_each_sample_even_behind_extended_headers(tmp_path):
    """ShardWriter records where each sample starts; a member whose long name needs a pax
    header (img2dataset's keys can be long) starts at that header, so a read from its offset
    is a well-formed tar stream beginning with that sample."""
    long_key = "x" * 120
    with ShardWriter(tmp_path, samples_per_shard=10) as w:
        for key in ("a", long_key, "c"):
            w.write({"__key__": key, "txt": f"caption of {key}", "json": b"{}"})
    offsets = read_offsets(tmp_path)["00000.tar"]
    assert offsets == sample_index(tmp_path / "00000.tar")["offsets"] and offsets[0] == 0
    got = [next(iter_raw_samples(str(tmp_path / "00000.tar"), offset=o)) for o in offsets]
    assert [r["__key__"] for r in got] == ["a", long_key, "c"]
    assert got[1]["txt"].decode() == f"caption of {long_key}"


@pytest.mark.parametrize("sized", [True, False])
def test_an_evaluation_split_with_fewer_shards_than_ranks_is_shared_not_repeated(demo_shards, tmp_path, sized):
    """One validation shard over 3 ranks: every sample is evaluated by exactly one rank.  With
    sample counts each rank reads a contiguous third (from its first sample's offset);
    without, each reads the shard and keeps every third sample.  Before, every rank evaluated
    all of it, and the summed count was 3 times the split's."""
    import shutil

    from conftest import tiny_overrides

    from dide_scale.config import load_config
    from dide_scale.data.pipeline import build_loader
    val = tmp_path / "val"
    shutil.copytree(demo_shards / "val", val)
    if not sized:
        (val / "sizes.json").unlink()
    cfg = load_config("debug", tiny_overrides(demo_shards, tmp_path / "run", **{
        "data.val_shards": f"{val}/00000.tar", "data.num_workers": 1}))
    whole = [r["__key__"] for r in iter_raw_samples(str(val / "00000.tar"))]
    shares = [[k for b in build_loader(cfg, "val", r, 3, batch_size=5) for k in b["keys"]] for r in range(3)]
    assert sorted(sum(shares, [])) == sorted(whole) and len(whole) == 48
    if sized:
        assert shares == [whole[:16], whole[16:32], whole[32:]]
    else:
        assert shares == [whole[0::3], whole[1::3], whole[2::3]]
