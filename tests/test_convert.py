"""Dataset converters on tiny fixtures in the official formats, written by the tests."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from dide_scale.data import convert as C
from dide_scale.data.cli import main as cli_main
from dide_scale.data.pipeline import iter_raw_samples
from dide_scale.data.shards import read_offsets, read_sizes
from dide_scale.data.transforms import Geometry, SampleDecoder

SIZE = Geometry("stretch", 8, 8, 8)  # every image to one 8x8 patch


def save_image(path, color, fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), color).save(path, format=fmt)
    return path


def write_json(path, obj, lines=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(o) for o in obj) + "\n" if lines else json.dumps(obj))
    return path


def read_out(d):
    """All samples of a converted directory, in shard order: [(key, {member: bytes})]."""
    return [(r["__key__"], {k: v for k, v in r.items() if not k.startswith("__")})
            for name in sorted(read_sizes(d)) for r in iter_raw_samples(str(d / name))]


def metas(d):
    return [json.loads(m["json"]) for _, m in read_out(d)]


# ---------------------------------------------------------------------------- COCO
@pytest.fixture
def coco(tmp_path):
    """Images 1-7: Karpathy 1,2,6,7 train, 3 restval (in val2014), 4 val, 5 test; 6 has no file."""
    split = {1: "train", 2: "train", 3: "restval", 4: "val", 5: "test", 6: "train", 7: "train"}
    files = {}
    for iid in split:
        sub = "val2014" if iid in (3, 4) else "train2014"
        name = f"COCO_{sub}_{iid:012d}.jpg"
        files[iid] = (sub, name)
        if iid != 6:
            save_image(tmp_path / "images" / sub / name, (30 * iid, 0, 0))
    ann = {"train2014": {"images": [], "annotations": []}, "val2014": {"images": [], "annotations": []}}
    aid = 100
    for iid, (sub, name) in files.items():
        ann[sub]["images"].append({"id": iid, "file_name": name, "width": 12, "height": 10})
        for c in range(2):
            ann[sub]["annotations"].append({"id": aid, "image_id": iid, "caption": f" image {iid}\ncaption {c} "})
            aid += 1
    ann["train2014"]["annotations"].append({"id": aid, "image_id": 7, "caption": "   "})
    karpathy = {"images": [{"cocoid": i, "split": s, "filename": files[i][1], "filepath": files[i][0],
                            "sentences": [{"raw": "x"}]} for i, s in split.items()]}
    return {"anns": [write_json(tmp_path / f"captions_{s}.json", a) for s, a in ann.items()],
            "images": tmp_path / "images", "karpathy": write_json(tmp_path / "dataset_coco.json", karpathy)}


def test_coco_keeps_karpathy_train_restval_one_sample_per_caption(coco, tmp_path):
    out = tmp_path / "out"
    st = C.convert_coco(coco["anns"], coco["images"], out, coco["karpathy"], samples_per_shard=3)
    samples = read_out(out)
    ms = [json.loads(m["json"]) for _, m in samples]
    assert sorted({m["image_id"] for m in ms}) == [1, 2, 3, 7]  # val (4) and test (5) are held out
    assert len(samples) == 8 and len({k for k, _ in samples}) == 8
    assert read_sizes(out) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 2}
    assert st["samples"] == 8 and st["skipped"] == {"empty_caption": 1, "missing_image": 2}
    assert st["excluded_captions"] == {"val": 2, "test": 2} and st["excluded_images"] == {"val": 1, "test": 1}
    for key, m in samples:  # caption text cleaned, JPEG copied byte for byte, decodable for ITM
        meta = json.loads(m["json"])
        assert m["txt"].decode() == meta["caption"] == f"image {meta['image_id']} caption {int(key[-1]) % 2}"
        sub = "val2014" if meta["image_id"] == 3 else "train2014"
        assert m["jpg"] == (coco["images"] / sub / meta["file_name"]).read_bytes()
        assert meta["split"] in ("train", "restval")
    dec = SampleDecoder("itm", SIZE)(samples[0][1] | {"__key__": samples[0][0]})
    assert dec["image"][0].shape == (1, 8 * 8 * 3) and dec["text"].startswith("image")
    # pairs are shuffled: the two captions of an image are not all adjacent
    ids = [m["image_id"] for m in ms]
    assert ids != sorted(ids)


def test_coco_without_karpathy_keeps_every_image(coco, tmp_path):
    st = C.convert_coco(coco["anns"], coco["images"], tmp_path / "out", samples_per_shard=100, progress=False)
    assert sorted({m["image_id"] for m in metas(tmp_path / "out")}) == [1, 2, 3, 4, 5, 7]
    assert st["samples"] == 12 and st["skipped"]["missing_image"] == 2


def test_coco_evaluation_split_is_written_image_by_image(coco, tmp_path):
    st = C.convert_coco(coco["anns"], coco["images"], tmp_path / "out", coco["karpathy"], splits=("val", "test"),
                        samples_per_shard=3, progress=False)
    assert st["order"] == "image" and [m["image_id"] for m in metas(tmp_path / "out")] == [4, 4, 5, 5]


# ---------------------------------------------------------------------------- Flickr30K
@pytest.fixture
def flickr(tmp_path):
    """A hand-made dataset_flickr30k.json: 1000, 2000 (one blank caption), 3000 (a PNG), 6000 (no
    file) train; 4000 val; 5000 test."""
    split = {"1000": "train", "2000": "train", "3000": "train", "4000": "val", "5000": "test", "6000": "train"}
    images = []
    for n, (stem, sp) in enumerate(split.items()):
        name = f"{stem}.png" if stem == "3000" else f"{stem}.jpg"
        if stem != "6000":
            save_image(tmp_path / "flickr30k-images" / ("sub" if stem == "2000" else "") / name, (40 * n, 9, 9),
                       "PNG" if stem == "3000" else "JPEG")
        caps = [f" a photo  {stem} \n number {c} " for c in range(2 if stem in ("3000", "6000") else 5)]
        if stem == "2000":
            caps[3] = "   "
        images.append({"filename": name, "imgid": n, "split": sp, "sentids": list(range(5 * n, 5 * n + len(caps))),
                       "sentences": [{"raw": c, "tokens": c.split(), "imgid": n, "sentid": 5 * n + i}
                                     for i, c in enumerate(caps)]})
    return {"json": write_json(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"}),
            "images": tmp_path / "flickr30k-images"}


def test_flickr30k_keeps_every_caption_of_the_split_images(flickr, tmp_path):
    out = tmp_path / "train"
    st = C.convert_flickr30k(flickr["json"], flickr["images"], out, samples_per_shard=4, progress=False)
    samples = read_out(out)
    ms = [json.loads(m["json"]) for _, m in samples]
    assert read_sizes(out) == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 3}
    assert sorted(k for k, _ in samples) == sorted([f"1000-{c}" for c in range(5)] + ["2000-0", "2000-1", "2000-2",
                                                                                     "2000-4", "3000-0", "3000-1"])
    assert st["samples"] == 11 and st["skipped"] == {"empty_caption": 1, "missing_image": 2}
    assert st["excluded_captions"] == {"val": 5, "test": 5} and st["excluded_images"] == {"val": 1, "test": 1}
    assert st["order"] == "shuffle" and [m["image_id"] for m in ms] != sorted(m["image_id"] for m in ms)
    for key, m in samples:
        meta = json.loads(m["json"])
        stem, c = key.split("-")
        assert meta["image_id"] == stem and meta["caption_index"] == int(c) and meta["split"] == "train"
        assert m["txt"].decode() == meta["caption"] == f"a photo {stem} number {c}"
        if stem == "1000":  # a JPEG is copied byte for byte; the PNG is re-encoded
            assert m["jpg"] == (flickr["images"] / "1000.jpg").read_bytes()
    dec = SampleDecoder("itm", SIZE)({"__key__": samples[0][0], **samples[0][1]})
    assert dec["image_id"] == samples[0][0].split("-")[0]


def test_flickr30k_test_split_image_by_image_and_retrieval_over_it(flickr, tmp_path, capsys):
    """The held-out splits through the command line: each image's five captions together, and
    a retrieval evaluation over them counts 2 images and 10 captions."""
    out = tmp_path / "eval"
    assert cli_main(["flickr30k", "--karpathy", str(flickr["json"]), "--images", str(flickr["images"]), "--out",
                     str(out), "--splits", "val,test", "--samples-per-shard", "3", "--no-progress"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["order"] == "image" and st["samples"] == 10 and st["images"] == 2
    assert [k for k, _ in read_out(out)] == [f"4000-{c}" for c in range(5)] + [f"5000-{c}" for c in range(5)]
    from dide_scale.config import load_config
    from dide_scale.data.pipeline import build_loader
    from dide_scale.evaluate import evaluate_retrieval
    from dide_scale.models.student import DualEncoder, TowerShape
    cfg = load_config("debug", ["data.tokenizer=builtin:demo", "train.task=itm", "data.num_workers=0",
                                f"data.val_shards={out}/{{00000..00003}}.tar", "data.image_resize=stretch",
                                "data.image_shorter=8", "data.image_longer=8", "student.arch.patch_size=8",
                                "student.arch.image_size=[8, 8]"])
    torch.manual_seed(0)
    model = DualEncoder(TowerShape(width=32, depth=1, heads=2, patch_size=8, image_size=[8, 8], max_text_len=16,
                                   vocab_size=128), "itm", 2)
    res = evaluate_retrieval(model, build_loader(cfg, "val", batch_size=4), "rerank", k=16)
    assert res["n_images"] == 2 and res["n_texts"] == 10 and res["i2t_r@1"] in (0.0, 0.5, 1.0)


# ---------------------------------------------------------------------------- resumability
def interrupt_after(monkeypatch, n):
    """Make the n+1-th image read fail, as a crash would."""
    real, calls = C.image_bytes, {"n": 0}

    def flaky(path):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt("simulated crash")
        return real(path)
    for module in (C.coco, C.vg, C.vqa):  # each converter module reads images with its own name for it
        monkeypatch.setattr(module, "image_bytes", flaky)
    return calls


def test_coco_interrupted_and_resumed_equals_uninterrupted(coco, tmp_path, monkeypatch):
    args = (coco["anns"], coco["images"])
    full = C.convert_coco(*args, tmp_path / "full", coco["karpathy"], samples_per_shard=3)
    out = tmp_path / "resumed"
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        C.convert_coco(*args, out, coco["karpathy"], samples_per_shard=3)
    assert 1 <= len(read_sizes(out)) < len(read_sizes(tmp_path / "full"))
    assert not list(out.glob("*.tmp"))  # no partial shard left behind
    monkeypatch.undo()
    calls = interrupt_after(monkeypatch, 10 ** 9)  # count the reads of the resumed run
    done = sum(read_sizes(out).values())
    st = C.convert_coco(*args, out, coco["karpathy"], samples_per_shard=3)
    assert calls["n"] < 10  # the converted part was not read again
    assert read_out(out) == read_out(tmp_path / "full")
    assert read_sizes(out) == read_sizes(tmp_path / "full")
    assert st["skipped"] == full["skipped"] and st["samples"] == full["samples"]
    assert st["resumed_after"] == done and st["written"] == full["samples"] - done
    # a finished conversion is left alone
    again = C.convert_coco(*args, out, coco["karpathy"], samples_per_shard=3)
    assert again["written"] == 0 and again["skipped"] == full["skipped"]


def test_resume_into_another_conversion_fails_clearly(coco, tmp_path, monkeypatch):
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        C.convert_coco(coco["anns"], coco["images"], out, coco["karpathy"], samples_per_shard=2)
    monkeypatch.undo()
    with pytest.raises(C.InputError, match="another conversion"):
        C.convert_coco(coco["anns"], coco["images"], out, coco["karpathy"], samples_per_shard=2, seed=1)


# ---------------------------------------------------------------------------- Visual Genome
def test_vg_regions_with_boxes(tmp_path):
    regions, image_data = [], []
    for iid in (1, 2, 3, 4):
        image_data.append({"image_id": iid, "url": f"http://x/{iid}.jpg", "width": 12, "height": 10,
                           "coco_id": 5 if iid == 4 else None})
        regions.append({"id": iid, "regions": [
            {"region_id": 10 * iid + r, "image_id": iid, "phrase": f"thing {r} ", "x": r, "y": 2, "width": 3,
             "height": 4} for r in range(3)]})
        if iid != 3:
            save_image(tmp_path / "VG" / ("VG_100K" if iid % 2 else "VG_100K_2") / f"{iid}.jpg", (0, 50 * iid, 0))
    rj = write_json(tmp_path / "region_descriptions.json", regions)
    ij = write_json(tmp_path / "image_data.json", image_data)
    kj = write_json(tmp_path / "dataset_coco.json", {"images": [{"cocoid": 5, "split": "test"}]})
    st = C.convert_vg(rj, tmp_path / "VG", tmp_path / "out", ij, kj, max_regions_per_image=2, samples_per_shard=3)
    ms = metas(tmp_path / "out")
    assert st["skipped"] == {"missing_image": 2} and st["excluded_coco_heldout_images"] == 1
    assert st["samples"] == 4 and sorted({m["image_id"] for m in ms}) == [1, 2]
    for m in ms:
        r = m["region_id"] % 10
        assert m["box"] == {"x": r, "y": 2, "width": 3, "height": 4} and m["caption"] == f"thing {r}"
        assert (m["image_width"], m["image_height"]) == (12, 10)
    assert read_sizes(tmp_path / "out") == {"00000.tar": 3, "00001.tar": 1}


# ---------------------------------------------------------------------------- img2dataset
def write_tar(path, samples, truncate=False):
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for suffix, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{suffix}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    if truncate:  # cut inside the data of the last member, as a killed download leaves it
        with tarfile.open(path) as tf:
            last = tf.getmembers()[-1]
        path.write_bytes(path.read_bytes()[:last.offset_data + 5])


@pytest.fixture
def i2d(tmp_path):
    d = tmp_path / "cc3m"
    d.mkdir()
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (1, 2, 3)).save(buf, format="JPEG")

    def s(i, txt=True):
        m = {"jpg": buf.getvalue(), "txt": f"caption {i}".encode(),
             "json": json.dumps({"key": f"{i:09d}", "caption": f"caption {i}", "status": "success"}).encode()}
        if not txt:
            del m["txt"]
        return f"{i:09d}", m
    write_tar(d / "00000.tar", [s(i) for i in range(5)])
    write_tar(d / "00001.tar", [s(10_000 + i, txt=i != 1) for i in range(4)])
    write_tar(d / "00002.tar", [s(20_000 + i) for i in range(3)], truncate=True)
    (d / "00000_stats.json").write_text(json.dumps({"successes": 5, "count": 6}))
    (d / "00001_stats.json").write_text(json.dumps({"successes": 3, "count": 4}))
    (d / "00000.parquet").write_bytes(b"PAR1")
    return d


def test_img2dataset_validate_in_place(i2d):
    st = C.convert_img2dataset(i2d)
    assert read_sizes(i2d) == {"00000.tar": 5, "00001.tar": 4}  # the truncated shard is left out
    # and each sample's byte offset: a read from offset k starts with sample k
    for name, offsets in read_offsets(i2d).items():
        keys = [r["__key__"] for r in iter_raw_samples(str(i2d / name))]
        assert [next(iter_raw_samples(str(i2d / name), offset=o))["__key__"] for o in offsets] == keys
    assert list(st["bad_shards"]) == ["00002.tar"] and "end of data" in st["bad_shards"]["00002.tar"]
    assert st["incomplete_samples"] == 1 and st["input_samples"] == 5 + 4 + 2
    assert st["stats_mismatch"] == {"00001.tar": {"stats_successes": 3, "in_tar": 4}}


def test_img2dataset_reshard_and_resume(i2d, tmp_path, monkeypatch):
    st = C.convert_img2dataset(i2d, tmp_path / "full", samples_per_shard=4)
    samples = read_out(tmp_path / "full")
    keys = [k for k, _ in samples]
    # complete samples only, in order, the readable part of the truncated shard salvaged
    assert keys == [f"{i:09d}" for i in [*range(5), 10_000, 10_002, 10_003, 20_000, 20_001]]
    assert read_sizes(tmp_path / "full") == {"00000.tar": 4, "00001.tar": 4, "00002.tar": 2}
    assert set(samples[0][1]) == {"jpg", "txt", "json"} and st["samples"] == 10
    assert SampleDecoder("itm", SIZE)(samples[-1][1])["text"] == "caption 20001"
    # interrupted mid-way (inside the second input shard), then resumed
    real, n = C.img2dataset._TarCursor.get, {"calls": 0}

    def flaky(self, path, key):
        n["calls"] += 1
        if n["calls"] > 6:
            raise KeyboardInterrupt
        return real(self, path, key)
    monkeypatch.setattr(C.img2dataset._TarCursor, "get", flaky)
    with pytest.raises(KeyboardInterrupt):
        C.convert_img2dataset(i2d, tmp_path / "out", samples_per_shard=4)
    assert read_sizes(tmp_path / "out") == {"00000.tar": 4}
    monkeypatch.undo()
    C.convert_img2dataset(i2d, tmp_path / "out", samples_per_shard=4)
    assert read_out(tmp_path / "out") == samples


# ---------------------------------------------------------------------------- VQAv2
@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("the red one", "red 1"), ("yes.", "yes"), ("dont", "don't"), ("1,000", "1000"),
    ("3.5", "3.5"), ("black-and-white", "black and white"), ("t - shirt", "t shirt"), ("A Dog!", "dog"),
    ("none", "0"), ("  Red\n", "red"), ("its", "its"), ("what's", "what's"),
])
def test_vqa_answer_normalisation(raw, norm):
    assert C.normalize_answer(raw) == norm


def test_vqa_soft_score_is_the_official_accuracy():
    scores = C.vqa_soft_scores(["2"] * 4 + ["3"] * 3 + ["4"] * 2 + ["5"])
    assert scores == {"2": 1.0, "3": 0.9, "4": 0.6, "5": 0.3}
    assert C.vqa_soft_scores(["yes"] * 10) == {"yes": 1.0}


@pytest.fixture
def vqa(tmp_path):
    img = tmp_path / "coco"
    for iid in (1, 2, 3):
        save_image(img / "train2014" / f"COCO_train2014_{iid:012d}.jpg", (80 * iid, 0, 0))
    save_image(img / "test2015" / f"COCO_test2015_{1:012d}.jpg", (0, 0, 200))  # same id, other split
    answers = {  # question_id -> (image_id, question, the 10 human answers, answer_type)
        11: (1, "How many dogs?", ["Two"] * 4 + ["2."] * 2 + ["three"] * 3 + ["4"], "number"),
        12: (1, "Is it red?", ["yes"] * 10, "yes/no"),
        21: (2, "What color?", ["Red"] * 6 + ["the red one"] * 4, "other"),
        22: (2, "Is it blue?", ["no"] * 9 + ["yes"], "yes/no"),
        31: (3, "Any cat?", ["yes"] * 7 + ["no"] * 3, "yes/no"),
        41: (4, "Missing image?", ["no"] * 10, "yes/no"),
    }
    mc = {11: "two", 12: "yes", 21: "red", 22: "no", 31: "yes", 41: "no"}
    q = {"data_subtype": "train2014",
         "questions": [{"image_id": i, "question": qq, "question_id": qid} for qid, (i, qq, _, _) in answers.items()]}
    a = {"annotations": [{"question_id": qid, "image_id": i, "answer_type": t, "question_type": "x",
                          "multiple_choice_answer": mc[qid],
                          "answers": [{"answer": s, "answer_confidence": "yes", "answer_id": k + 1}
                                      for k, s in enumerate(ans)]}
                         for qid, (i, _, ans, t) in answers.items()]}
    return {"q": write_json(tmp_path / "q.json", q), "a": write_json(tmp_path / "a.json", a), "images": img}


def test_vqa_vocabulary_soft_targets_and_test_split(vqa, tmp_path):
    out = tmp_path / "train"
    st = C.convert_vqa(vqa["q"], vqa["images"], out, vqa["a"], num_answers=3, samples_per_shard=4)
    vocab = json.loads((out / "answers.json").read_text())
    assert vocab == ["no", "yes", "2"]  # 2 x no, 2 x yes, then 1 x {2, red}: ties alphabetical
    assert st["answers"] == 3 and st["skipped"] == {"missing_image": 1} and st["no_answer_in_vocab"] == 1
    raw = {k: m for k, m in read_out(out)}
    assert sorted(raw) == ["11", "12", "21", "22", "31"] and read_sizes(out) == {"00000.tar": 4, "00001.tar": 1}
    meta = json.loads(raw["11"]["json"])
    assert meta["answers"] == {"2": 1.0, "3": 0.9, "4": 0.3} and meta["question_id"] == 11
    assert meta["qtype"] == "number" and raw["11"]["txt"] == b"How many dogs?"
    dec = SampleDecoder("vqa", SIZE, answers=vocab)
    s = dec({"__key__": "11", **raw["11"]})
    assert torch.allclose(s["label"], torch.tensor([0.0, 0.0, 1.0])) and s["question_id"] == 11
    s = dec({"__key__": "31", **raw["31"]})
    assert torch.allclose(s["label"], torch.tensor([0.9, 1.0, 0.0]))
    # the image of the train subtype is chosen over the test2015 file with the same id
    assert raw["11"]["jpg"] == (vqa["images"] / "train2014" / f"COCO_train2014_{1:012d}.jpg").read_bytes()

    # val: the train vocabulary is reused; test: no annotations, questions only
    C.convert_vqa(vqa["q"], vqa["images"], tmp_path / "val", vqa["a"], answer_vocab=out / "answers.json")
    assert json.loads((tmp_path / "val" / "answers.json").read_text()) == vocab
    C.convert_vqa(vqa["q"], vqa["images"], tmp_path / "test")
    t = metas(tmp_path / "test")
    assert len(t) == 5 and all("answers" not in m for m in t) and {m["question_id"] for m in t} >= {11, 31}
    raw_t = read_out(tmp_path / "test")[0]
    assert SampleDecoder("vqa", SIZE, answers=vocab)({"__key__": raw_t[0], **raw_t[1]})["label"].sum() == 0


def test_vqa_red_one_normalises_like_the_official_eval(vqa, tmp_path):
    # "the red one" -> "red 1" (official: numbers mapped, article dropped); "Red" -> "red"
    C.convert_vqa(vqa["q"], vqa["images"], tmp_path / "o", vqa["a"], num_answers=10)
    m = {mm["question_id"]: mm for mm in metas(tmp_path / "o")}
    assert m[21]["answers"] == {"red": 1.0, "red 1": 1.0}


# ---------------------------------------------------------------------------- NLVR2
def test_nlvr2_pairs_and_labels(tmp_path):
    imgs = tmp_path / "nlvr2" / "images" / "train"
    rows = []
    for n, (label, ok) in enumerate([("True", True), ("False", True), ("True", False)]):
        pair = f"train-{100 + n}-0"
        save_image(imgs / str(n) / f"{pair}-img0.png", (200, 0, 0), "PNG")
        if ok:
            rgba = Image.new("RGBA", (12, 10), (0, 0, 200, 255))
            (imgs / str(n)).mkdir(parents=True, exist_ok=True)
            rgba.save(imgs / str(n) / f"{pair}-img1.png")
        rows.append({"identifier": f"{pair}-{n}", "sentence": f"statement {n}", "label": label,
                     "left_url": "x", "right_url": "y"})
    data = write_json(tmp_path / "train.json", rows, lines=True)
    st = C.convert_nlvr2(data, tmp_path / "nlvr2", tmp_path / "out", samples_per_shard=5)
    assert st["samples"] == 2 and st["skipped"] == {"missing_image": 1}
    raw = read_out(tmp_path / "out")
    assert [k for k, _ in raw] == ["train-100-0-0", "train-101-0-1"]
    assert set(raw[0][1]) == {"jpg", "image2.jpg", "txt", "json"} and raw[0][1]["jpg"][:2] == b"\xff\xd8"
    dec = SampleDecoder("nlvr2", SIZE)
    a, b = (dec({"__key__": k, **m}) for k, m in raw)
    assert (a["label"], b["label"]) == (1, 0) and a["text"] == "statement 0"
    assert a["image"][0].shape == a["image2"][0].shape == (1, 8 * 8 * 3)
    left, right = a["image"][0].view(-1, 3).float().mean(0), a["image2"][0].view(-1, 3).float().mean(0)
    assert left[0] > 150 and right[2] > 150  # left red, right blue
    assert json.loads(raw[1][1]["json"])["label"] is False


# ---------------------------------------------------------------------------- SNLI-VE
def test_snli_ve_labels(tmp_path):
    for fid in ("100", "200"):
        save_image(tmp_path / "flickr30k_images" / f"{fid}.jpg", (0, 120, 0))
    rows = [{"Flickr30K_ID": "100", "sentence1": "p", "sentence2": "a dog runs", "gold_label": "entailment",
             "pairID": "100.jpg#0r1e"},
            {"Flickr30K_ID": "100", "sentence2": "a cat sits", "gold_label": "contradiction", "pairID": "100.jpg#0r1c"},
            {"Flickr30K_ID": "200", "sentence2": "it is old", "gold_label": "neutral", "pairID": "200.jpg#0r1n"},
            {"Flickr30K_ID": "200", "sentence2": "unclear", "gold_label": "-", "pairID": "200.jpg#0r2n"},
            {"Flickr30K_ID": "300", "sentence2": "no image", "gold_label": "neutral", "pairID": "300.jpg#0r1n"}]
    data = write_json(tmp_path / "snli_ve_train.jsonl", rows, lines=True)
    st = C.convert_snli_ve(data, tmp_path / "flickr30k_images", tmp_path / "out", samples_per_shard=2)
    assert st["skipped"] == {"bad_label": 1, "missing_image": 1} and read_sizes(tmp_path / "out") == {
        "00000.tar": 2, "00001.tar": 1}
    raw = read_out(tmp_path / "out")
    assert [k for k, _ in raw] == ["100_jpg_0r1e", "100_jpg_0r1c", "200_jpg_0r1n"]
    dec = SampleDecoder("snli_ve", SIZE)
    assert [dec({"__key__": k, **m})["label"] for k, m in raw] == [0, 2, 1]
    assert json.loads(raw[0][1]["json"])["pair_id"] == "100.jpg#0r1e"


# ---------------------------------------------------------------------------- malformed inputs, CLI
@pytest.mark.parametrize("case", ["coco_keys", "coco_json", "vqa_field", "nlvr2_line", "nlvr2_label", "snli_field",
                                  "flickr_sentences", "flickr_raw"])
def test_malformed_inputs_fail_with_a_clear_message(tmp_path, case):
    (tmp_path / "img").mkdir()
    f = tmp_path / "input.json"
    if case == "coco_keys":
        write_json(f, {"images": []})
        call, want = lambda: C.convert_coco(f, tmp_path / "img", tmp_path / "o"), "'annotations' list"
    elif case == "coco_json":
        f.write_text('{"images": [')
        call, want = lambda: C.convert_coco(f, tmp_path / "img", tmp_path / "o"), "not valid JSON"
    elif case == "vqa_field":
        write_json(f, {"questions": [{"image_id": 1, "question": "q?"}]})
        call, want = lambda: C.convert_vqa(f, tmp_path / "img", tmp_path / "o"), "questions[0]: lacks 'question_id'"
    elif case == "nlvr2_line":
        f.write_text('{"identifier": "dev-1-0-0", "sentence": "s", "label": "True"}\nnot json\n')
        call, want = lambda: C.convert_nlvr2(f, tmp_path / "img", tmp_path / "o"), ":2: not valid JSON"
    elif case == "nlvr2_label":
        write_json(f, [{"identifier": "dev-1-0-0", "sentence": "s", "label": "maybe"}], lines=True)
        call, want = lambda: C.convert_nlvr2(f, tmp_path / "img", tmp_path / "o"), "is not 'True' or 'False'"
    elif case == "flickr_sentences":
        write_json(f, {"images": [{"filename": "1.jpg", "split": "test"}]})
        call, want = lambda: C.convert_flickr30k(f, tmp_path / "img", tmp_path / "o"), "images[0]: lacks 'sentences'"
    elif case == "flickr_raw":
        write_json(f, {"images": [{"filename": "1.jpg", "split": "test", "sentences": [{"raw": "a"}, {"tokens": []}]}]})
        call, want = (lambda: C.convert_flickr30k(f, tmp_path / "img", tmp_path / "o"),
                      "images[0].sentences[1]: lacks 'raw'")
    else:
        write_json(f, [{"Flickr30K_ID": "1", "hypothesis": "h", "gold_label": "neutral"}], lines=True)
        call, want = lambda: C.convert_snli_ve(f, tmp_path / "img", tmp_path / "o"), "lacks 'sentence2'"
    with pytest.raises(C.InputError) as e:
        call()
    assert str(f) in str(e.value) and want in str(e.value)


def test_cli_subcommands(tmp_path, capsys, i2d):
    save_image(tmp_path / "img" / "dev-1-0-img0.png", (9, 9, 9), "PNG")
    save_image(tmp_path / "img" / "dev-1-0-img1.png", (9, 9, 9), "PNG")
    data = write_json(tmp_path / "dev.json", [{"identifier": "dev-1-0-0", "sentence": "s", "label": "True"}],
                      lines=True)
    out = tmp_path / "out"
    assert cli_main(["nlvr2", "--data", str(data), "--images", str(tmp_path / "img"), "--out", str(out),
                     "--samples-per-shard", "10", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 1
    assert cli_main(["inspect", str(out / "00000.tar")]) == 0
    assert json.loads(capsys.readouterr().out)["members"] == ["image2.jpg", "jpg", "json", "txt"]
    assert cli_main(["img2dataset", str(i2d), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["bad_shards"].keys() == {"00002.tar"}
    assert cli_main(["img2dataset", str(i2d), "--samples-per-shard", "3"]) == 2  # no --out
    assert cli_main(["snli_ve", "--data", str(tmp_path / "nope.jsonl"), "--images", str(tmp_path / "img"),
                     "--out", str(out)]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err


def test_resume_without_saved_counts_finds_the_last_key(coco, tmp_path, monkeypatch):
    """Killed between writing sizes.json and the stats: the position is found by key."""
    args = (coco["anns"], coco["images"])
    C.convert_coco(*args, tmp_path / "full", coco["karpathy"], samples_per_shard=2)
    out = tmp_path / "out"
    interrupt_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        C.convert_coco(*args, out, coco["karpathy"], samples_per_shard=2)
    monkeypatch.undo()
    (out / C.STATS).unlink()
    C.convert_coco(*args, out, coco["karpathy"], samples_per_shard=2)
    assert read_out(out) == read_out(tmp_path / "full")


def test_coco_samples_carry_every_reference_caption_of_their_image(coco, tmp_path):
    """Captioning evaluation reads an image's references off any one of its samples."""
    C.convert_coco(coco["anns"], coco["images"], tmp_path / "out", samples_per_shard=100, progress=False)
    by_image = {}
    for m in metas(tmp_path / "out"):
        by_image.setdefault(m["image_id"], set()).add(m["caption"])
        assert m["caption"] in m["references"]
    for m in metas(tmp_path / "out"):
        assert sorted(m["references"]) == sorted(by_image[m["image_id"]])  # the empty caption of 7 left out
    dec = SampleDecoder("caption", SIZE)(read_out(tmp_path / "out")[0][1] | {"__key__": "k", "__seed__": 3})
    assert dec["references"] == metas(tmp_path / "out")[0]["references"] and dec["seed"] == 3
