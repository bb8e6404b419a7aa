"""Retrieval as deployed: contrastive top-k re-ranked by the ITM head, split over ranks."""
import json
import random

import pytest
import torch
from conftest import TINY_ARCH
from dist_utils import run_ranks

from dide_scale.evaluate import evaluate_retrieval, retrieval_recall
from dide_scale.retrieval import MISS, retrieval_ranks

# captions per image: several, as COCO / Flickr30K have five; 16 captions of 7 images
CAPTIONS = [3, 1, 2, 5, 1, 2, 2]
SHARD_SIZES = [6, 2, 4, 1, 3]  # uneven: 2 ranks read 13 and 3 captions, 3 ranks 7, 5 and 4
WORDS = "red green blue yellow purple white square circle triangle small large one two three four".split()


def write_split(root, shard_sizes=SHARD_SIZES):
    """Caption shards of random 32x32 photos, pairs shuffled so an image's captions sit in
    different shards (and on different ranks)."""
    from PIL import Image

    from dide_scale.data.shards import ShardWriter, jpeg_bytes, sample
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    photos = [jpeg_bytes(Image.fromarray(torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()))
              for _ in CAPTIONS]
    pairs = [(i, c) for i, n in enumerate(CAPTIONS) for c in range(n)]
    rng.shuffle(pairs)
    assert sum(shard_sizes) == len(pairs)
    start = 0
    for shard, size in enumerate(shard_sizes):
        with ShardWriter(root, size, start_shard=shard) as w:
            for i, c in pairs[start:start + size]:
                text = " ".join(rng.choices(WORDS, k=6))
                w.write(sample(f"img{i}-{c}", photos[i], text, {"image_id": f"img{i}"}))
        start += size
    return f"{root}/{{00000..{len(shard_sizes) - 1:05d}}}.tar"


def loader_for(shards, rank=0, world=1, batch_size=4):
    from dide_scale.config import load_config
    from dide_scale.data.pipeline import build_loader
    cfg = load_config("debug", [f"student.arch={TINY_ARCH}", "data.tokenizer=builtin:demo", "train.task=itm",
                                f"data.val_shards={shards}", "data.num_workers=0", "data.image_shorter=32",
                                "data.image_longer=32"])
    return build_loader(cfg, "val", rank, world, batch_size=batch_size, exclusive=True)


def tiny_model():
    from dide_scale.models.student import DualEncoder, TowerShape
    torch.manual_seed(0)
    return DualEncoder(TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16,
                                  vocab_size=128), "itm", 2)


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("retrieval"))


def all_samples(shards):
    """Every (text, image) of the split embedded without the retrieval code, in file order: the
    reference.  Returns (model, inference, texts, images by id, each text's image, text keys)."""
    from dide_scale.inference import DualEncoderInference
    from dide_scale.models.images import from_batch
    model = tiny_model()
    inf = DualEncoderInference(model)
    (b,) = list(loader_for(shards, batch_size=100))
    t = inf.encode_texts(b["input_ids"], b["attention_mask"])
    im = inf.encode_images(from_batch(b))
    ids = sorted(set(b["image_ids"]))
    first = [b["image_ids"].index(i) for i in ids]
    return model, inf, t, im[first], torch.tensor([ids.index(i) for i in b["image_ids"]]), list(b["keys"])


def test_rerank_with_every_candidate_equals_exhaustive_itm(split):
    """K at least the split's image and caption counts re-scores every pair: the ranks of every
    query, and so the recall, are those of the ITM head over all pairs; both equal the figures
    of an independent reference (the full score matrix of ``pair_scores``)."""
    model, inf, t, im, owner, _ = all_samples(split)
    assert len(t) == 16 and len(im) == 7
    rerank, emb = retrieval_ranks(tiny_model(), loader_for(split), "rerank", k=16)
    itm, _ = retrieval_ranks(tiny_model(), loader_for(split), "itm")
    assert rerank.candidates == {"t2i": 7, "i2t": 16}
    assert torch.equal(rerank.t2i, itm.t2i) and torch.equal(rerank.i2t, itm.i2t)
    assert (rerank.t2i != MISS).all() and (rerank.i2t != MISS).all()
    ref = retrieval_recall(inf.pair_scores(t, im), owner)
    assert rerank.recall() == itm.recall() == ref
    for k in (16, 10_000):
        res = evaluate_retrieval(tiny_model(), loader_for(split), "rerank", k=k)
        assert {key: res[key] for key in ref} == ref and res["n_texts"] == 16 and res["n_images"] == 7
    # the contrastive ranks equal the reference's cosine matrix
    with torch.inference_mode():
        te, ie = model.contrastive_embeddings(t, im)
    itc = evaluate_retrieval(tiny_model(), loader_for(split), "itc")
    assert {key: itc[key] for key in ref} == retrieval_recall(te @ ie.t(), owner)
    # the embeddings are the reference's, texts ordered by key and images by id
    assert emb.image_ids == [f"img{i}" for i in range(7)]
    assert emb.text_keys == sorted(emb.text_keys) and len(set(emb.text_keys)) == 16


def test_rerank_keeps_the_contrastive_top_k_and_ranks_them_by_itm(split):
    """K = 3, against a loop over queries: the 3 best candidates by cosine, re-scored by the ITM
    head; a positive outside them is a miss at every k."""
    model, inf, t, im, owner, keys = all_samples(split)
    ranks, emb = retrieval_ranks(tiny_model(), loader_for(split), "rerank", k=3)
    with torch.inference_mode():
        te, ie = model.contrastive_embeddings(t, im)
    sim, itm = te @ ie.t(), inf.pair_scores(t, im)
    owner = owner.tolist()
    want_t2i, want_i2t = [], []
    for key in emb.text_keys:  # the retrieval's order: texts by key
        j = keys.index(key)
        cand = sim[j].topk(3).indices.tolist()
        want_t2i.append(sum(int(itm[j, c] > itm[j, owner[j]]) for c in cand) if owner[j] in cand else MISS)
    for i in range(7):
        cand = sim[:, i].topk(3).indices.tolist()
        own = [c for c in cand if owner[c] == i]
        want_i2t.append(min(sum(int(itm[c2, i] > itm[c, i]) for c2 in cand) for c in own) if own else MISS)
    assert ranks.t2i.tolist() == want_t2i and ranks.i2t.tolist() == want_i2t
    assert MISS in ranks.t2i.tolist()  # a random model misses some: the case is exercised
    r = ranks.recall()
    assert r["t2i_r@5"] == r["t2i_r@10"] == (ranks.t2i < 3).float().mean().item()


def test_retrieval_needs_a_dual_encoder_and_a_known_scorer(split):
    from dide_scale.models.fusion import FusionEncoder
    with pytest.raises(ValueError, match="dual encoder"):
        retrieval_ranks(FusionEncoder(tiny_model().shape, "itm", 2), loader_for(split))
    with pytest.raises(ValueError, match="scorer='topk' must be one of rerank, itc, itm"):
        retrieval_ranks(tiny_model(), loader_for(split), "topk")


def test_dide_eval_refuses_fewer_than_ten_candidates(split, tmp_path, capsys):
    from dide_scale.evaluate import main as eval_main
    from dide_scale.models.saved import save_pretrained
    save_pretrained(tiny_model(), tmp_path / "model")
    assert eval_main(["--model", str(tmp_path / "model"), "--shards", split, "--k", "5"]) == 2
    assert "--k 5: recall@10 needs at least ten candidates per query" in capsys.readouterr().err


# -- over ranks ---------------------------------------------------------------------------

def ranks_worker(args: dict) -> dict:
    """This rank's view: the ranks of every query, the captions it read itself, and how often
    it called each module (lock-step ranks must call each as often as the others)."""
    import torch.distributed as dist

    from dide_scale import distributed
    env = distributed.detect()
    if any(spec.get("zero3") for spec in args["cases"].values()):
        from dide_scale import engine
        engine.init_distributed(env, 120)
    else:
        dist.init_process_group("gloo")
    out = {}
    for name, spec in args["cases"].items():
        model = tiny_model()
        if spec.get("zero3"):  # real ZeRO-3: every forward gathers the partitioned parameters
            import deepspeed
            eng, *_ = deepspeed.initialize(model=model, config={
                "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                "train_batch_size": env.world_size, "steps_per_print": 10 ** 9,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
            model = eng.module
        calls = {}
        for part in ("image", "text", "fusion", "head", "itc_text", "itc_image"):
            getattr(model, part).register_forward_pre_hook(
                lambda mod, inp, part=part: calls.__setitem__(part, calls.get(part, 0) + 1))
        read = []
        loader = loader_for(spec["shards"], env.rank, env.world_size)

        def counting(loader=loader, read=read):
            for b in loader:
                read.extend(b["keys"])
                yield b
        ranks, emb = retrieval_ranks(model, counting(), spec["scorer"], spec.get("k", 128), prepare=False,
                                     partitioned=spec.get("partitioned", False))
        out[name] = {"t2i": ranks.t2i.tolist(), "i2t": ranks.i2t.tolist(), "read": read, "calls": calls,
                     "images": emb.image_ids, "texts": emb.text_keys}
    if "model" in args:  # the command line under torchrun: each rank reads its share, rank 0 prints
        import contextlib
        import io

        from dide_scale.evaluate import main as eval_main
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = eval_main(["--model", args["model"], "--shards", args["cases"]["itc"]["shards"], "--k", "16",
                              "data.tokenizer=builtin:demo", f"student.arch={TINY_ARCH}", "data.image_shorter=32",
                              "data.image_longer=32", "data.num_workers=0"])
        out["dide_eval"] = {"code": code, "stdout": buf.getvalue()}
    dist.barrier()
    return out


@pytest.mark.distributed
def test_retrieval_over_two_and_three_ranks_equals_one_process(tmp_path):
    """Uneven shares (5 shards of 6, 2, 4, 1, 3 captions; an image's captions on several ranks;
    on 2 shards the third rank reads nothing): every rank returns the ranks of one process,
    no rank reads the whole split, and lock-step ranks (ZeRO-3 among them) call every module
    equally often."""
    five = write_split(tmp_path / "five")
    two = write_split(tmp_path / "two", [9, 7])
    cases2 = {"rerank_zero3": {"shards": five, "scorer": "rerank", "k": 3, "partitioned": True, "zero3": True},
              "itm": {"shards": five, "scorer": "itm"}}
    cases3 = {"rerank_partitioned": {"shards": five, "scorer": "rerank", "k": 3, "partitioned": True},
              "itc": {"shards": five, "scorer": "itc"}, "rerank_idle_rank": {"shards": two, "scorer": "rerank", "k": 3}}
    for world in (2, 3):
        (tmp_path / f"w{world}").mkdir()
    from dide_scale.models.saved import save_pretrained
    save_pretrained(tiny_model(), tmp_path / "model")
    results = {2: run_ranks("test_retrieval:ranks_worker", 2, {"cases": cases2}, tmp_path / "w2"),
               3: run_ranks("test_retrieval:ranks_worker", 3, {"cases": cases3, "model": str(tmp_path / "model")},
                            tmp_path / "w3")}
    for world, cases in ((2, cases2), (3, cases3)):
        for name, spec in cases.items():
            ref, emb = retrieval_ranks(tiny_model(), loader_for(spec["shards"]), spec["scorer"], spec.get("k", 128))
            reads = [len(r[name]["read"]) for r in results[world]]
            assert sum(reads) == 16 and max(reads) < 16, (world, name, reads)
            for rank, res in enumerate(results[world]):
                got = res[name]
                assert got["t2i"] == ref.t2i.tolist() and got["i2t"] == ref.i2t.tolist(), (world, name, rank)
                assert got["texts"] == emb.text_keys and got["images"] == emb.image_ids
                if spec.get("partitioned"):
                    assert got["calls"] == results[world][0][name]["calls"], (world, name, rank)
    assert [len(r["rerank_idle_rank"]["read"]) for r in results[3]] == [9, 7, 0]
    # dide-eval under torchrun: the default scorer is rerank; one answer, from rank 0
    assert [r["dide_eval"]["code"] for r in results[3]] == [0, 0, 0]
    assert [r["dide_eval"]["stdout"] for r in results[3][1:]] == ["", ""]
    printed = json.loads(results[3][0]["dide_eval"]["stdout"])
    want = evaluate_retrieval(tiny_model(), loader_for(five), "rerank", k=16)
    assert printed == json.loads(json.dumps(want)) and printed["candidates"] == {"t2i": 7, "i2t": 16}
    assert [len(r["itm"]["read"]) for r in results[2]] == [13, 3]
    assert [len(r["itc"]["read"]) for r in results[3]] == [7, 5, 4]


@pytest.mark.parametrize("name, pairs, k, teacher", [
    ("finetune_retrieval_flickr", 145_000, 128, "vilt_irtr_f30k.ckpt"),
    ("finetune_retrieval_coco", 566_747, 256, "vilt_irtr_coco.ckpt")])
def test_retrieval_presets_fine_tune_with_the_pretraining_losses(name, pairs, k, teacher):
    """ITM + ITC with hard negatives and distillation, as pre-training, from ViLT's own IR/TR
    checkpoint of the dataset (its retrieval head); ViLT's IR/TR recipe (batch 256, 10 epochs
    of the train pairs); selection by the rerank protocol."""
    from dide_scale.config import load_config
    cfg, pre = load_config(name), load_config("pretrain_b32")
    assert cfg.train.task == "itm" and cfg.loss == pre.loss and cfg.data.tokenizer == pre.data.tokenizer
    assert cfg.teacher.kind == "vilt_ckpt" and cfg.teacher.path.endswith(teacher) and cfg.teacher.itm_head == "auto"
    assert cfg.student.init == "export:runs/pretrain_b32/export" and not cfg.data.resampled
    assert cfg.train.global_batch_size == 256 and round(cfg.train.max_steps * 256 / pairs, 2) == 10.0
    assert cfg.train.eval_retrieval == "rerank" and cfg.train.eval_retrieval_k == k
