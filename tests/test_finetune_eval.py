"""Pre-train (ITM) -> export -> fine-tune on each demo task -> evaluate, end to end."""
import json

import pytest
import torch
from conftest import TINY_ARCH, labelled, tiny_overrides

from dide_scale.data.demo import generate_split
from dide_scale.evaluate import main as eval_main
from dide_scale.evaluate import retrieval_recall
from dide_scale.finetune import main as finetune_main
from dide_scale.models.fusion import FusionEncoder
from dide_scale.models.images import images_from_pixels
from dide_scale.models.saved import load_pretrained, save_pretrained
from dide_scale.models.student import TowerShape
from dide_scale.train import main as pretrain_main

SHAPE = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)


@pytest.fixture(scope="module")
def pretrained(demo_shards, tmp_path_factory):
    """A tiny ITM distillation pre-training run (teacher: a random fusion ITM model)."""
    root = tmp_path_factory.mktemp("pre")
    torch.manual_seed(0)
    save_pretrained(labelled(FusionEncoder(SHAPE, "itm", 2)), root / "teacher")
    run = root / "run"
    assert pretrain_main(["--config", "debug", *tiny_overrides(demo_shards, run, **{
        "train.task": "itm", "teacher.path": str(root / "teacher"), "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0,
        "loss.soft_label": 1.0, "loss.ground_truth": 1.0, "loss.itc": 1.0, "train.eval_retrieval_k": 16})]) == 0
    hist = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(k in hist[-1] for k in ("loss/itc", "loss/attn_t2i", "loss/soft_label", "loss/ground_truth"))
    return run / "export"


def test_pretraining_ends_with_zero_shot_rerank_retrieval(pretrained, demo_shards, capsys):
    """The dev-split evaluation of ITM pre-training is the deployed protocol: contrastive top
    train.eval_retrieval_k re-scored by the ITM head; dide-eval on the export agrees."""
    ev = json.loads((pretrained.parent / "summary.json").read_text())["eval"]
    assert ev["scorer"] == "rerank" and ev["k"] == 16 and ev["candidates"] == {"t2i": 16, "i2t": 16}
    assert ev["n_texts"] == ev["n_images"] == 48
    assert ev["accuracy"] == pytest.approx((ev["t2i_r@1"] + ev["i2t_r@1"]) / 2)
    assert eval_main(["--model", str(pretrained), "--shards", f"{demo_shards}/val/00000.tar", "--k", "16",
                      "data.tokenizer=builtin:demo", f"student.arch={TINY_ARCH}"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["scorer"] == "rerank" and {k: res[k] for k in ev["per_type"]} == ev["per_type"]


@pytest.mark.parametrize("task, n_cls", [("vqa", 16), ("nlvr2", 2), ("snli_ve", 3)])
def test_finetune_from_pretrained_export_then_eval(pretrained, tmp_path, task, n_cls):
    data = tmp_path / "data"
    generate_split(data / "train", 64, 0, task, samples_per_shard=32)
    generate_split(data / "val", 24, 1, task, samples_per_shard=32)
    torch.manual_seed(1)
    save_pretrained(labelled(FusionEncoder(SHAPE, task, n_cls)), tmp_path / "teacher")
    run = tmp_path / "ft"
    ov = tiny_overrides(data, run, **{
        "train.task": task, "student.init": f"export:{pretrained}", "teacher.path": str(tmp_path / "teacher"),
        "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0, "loss.soft_label": 1.0, "loss.ground_truth": 0.0,
        "data.train_shards": f"{data}/train/{{00000..00001}}.tar", "data.val_shards": f"{data}/val/00000.tar",
        "optim.head_lr_mult": 10.0, "train.eval_every": 1, "optim.lr": 3e-3})
    assert finetune_main(["--config", "debug", *ov]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["n"] == 24 and 0 <= summary["eval"]["accuracy"] <= 1
    # model selection on the dev split: best/ holds the weights of the best evaluation, and
    # evaluating them again gives exactly the recorded score
    evals = [float(line.split("accuracy ")[1].split()[0]) for line in
             (run / "logs" / "rank000.log").read_text().splitlines() if "eval step" in line]
    best = json.loads((run / "best" / "best.json").read_text())
    assert len(evals) == 4 and summary["best"] == {"step": best["step"], "accuracy": best["accuracy"]}
    assert best["accuracy"] == pytest.approx(max(evals), abs=1e-4)
    assert best["step"] == 1 + max(range(4), key=lambda i: (evals[i], -i))  # the first of equal scores
    # the pre-trained towers were loaded: they differ from a random init but equal the export at step 0
    exported = load_pretrained(run / "export")
    assert exported.task == task and exported.num_classes == n_cls
    args = ["--model", str(run / "export"), "--shards", f"{data}/val/00000.tar", "data.tokenizer=builtin:demo",
            f"student.arch={TINY_ARCH}", f"data.num_answers={16}"]
    vqa_json = tmp_path / "answers.json"
    if task == "vqa":
        args += ["--vqa-json", str(vqa_json)]
    assert eval_main(args) == 0
    if task == "vqa":
        rows = json.loads(vqa_json.read_text())
        assert len(rows) == 24 and set(rows[0]) == {"question_id", "answer"}
    from dide_scale.config import load_config
    from dide_scale.data.pipeline import build_loader
    from dide_scale.evaluate import evaluate
    cfg = load_config("debug", [f"data.val_shards={data}/val/00000.tar", "data.tokenizer=builtin:demo",
                                f"train.task={task}", "data.num_answers=16", "data.num_workers=0"])
    again = evaluate(load_pretrained(run / "best"), build_loader(cfg, "val"), task, "cpu")
    assert again["accuracy"] == pytest.approx(best["accuracy"], abs=1e-6)


def test_lr_schedule_counts_optimizer_steps_under_accumulation():
    from dide_scale.engine import lr_lambda
    f = lr_lambda(max_steps=100, warmup_fraction=0.1, min_ratio=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.0)
    assert f(55) == pytest.approx(0.5)


def test_retrieval_recall_against_naive_ranks():
    r = retrieval_recall(torch.eye(4), ks=(1,))
    assert r["t2i_r@1"] == 1.0 and r["i2t_r@1"] == 1.0
    r = retrieval_recall(torch.eye(4).roll(1, 1), ks=(1, 5))
    assert r["t2i_r@1"] == 0.0 and r["t2i_r@5"] == 1.0
    # several captions per image: an image is a hit when any of its captions ranks in its top k
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(9, 4, generator=g)
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    got = retrieval_recall(sim, owner, ks=(1, 2, 3))
    for k in (1, 2, 3):
        t2i = sum(int((sim[j] > sim[j, owner[j]]).sum()) < k for j in range(9)) / 9
        i2t = sum(any(int((sim[:, i] > sim[j, i]).sum()) < k for j in range(9) if owner[j] == i) for i in range(4)) / 4
        assert got[f"t2i_r@{k}"] == pytest.approx(t2i) and got[f"i2t_r@{k}"] == pytest.approx(i2t)


def test_retrieval_counts_each_image_once_when_a_batch_repeats_it():
    from dide_scale.evaluate import evaluate_retrieval
    from dide_scale.inference import DualEncoderInference
    from dide_scale.models.student import DualEncoder
    torch.manual_seed(0)
    model = DualEncoder(SHAPE, "itm", 2)
    pix = images_from_pixels(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8), 8)
    ids = torch.randint(5, 100, (5, 16))
    mask = torch.ones_like(ids)

    def batch(rows, text):
        return {"patches": pix.patches[rows], "patch_coord": pix.coord[rows], "patch_valid": pix.valid[rows],
                "input_ids": ids[text], "attention_mask": mask[text]}
    # captions 0, 1 of image A; 2 of image B (batch 1); 3 of A again, 4 of image C (batch 2)
    loader = [{**batch([0, 0, 1], slice(0, 3)), "image_ids": ["A", "A", "B"], "keys": ["k0", "k1", "k2"]},
              {**batch([0, 2], slice(3, 5)), "image_ids": ["A", "C"], "keys": ["k3", "k4"]}]
    res = evaluate_retrieval(model, loader, "itm")
    assert res["n_images"] == 3 and res["n_texts"] == 5
    inf = DualEncoderInference(model)
    sim = inf.pair_scores(inf.encode_texts(ids, mask), inf.encode_images(pix))
    want = retrieval_recall(sim, torch.tensor([0, 0, 1, 0, 2]))
    assert {k: res[k] for k in want} == want


@pytest.mark.parametrize("scorer", ["itm", "itc", "rerank"])
def test_dide_eval_retrieval_on_caption_shards(pretrained, demo_shards, scorer, capsys):
    assert eval_main(["--model", str(pretrained), "--shards", f"{demo_shards}/val/00000.tar", "--retrieval", scorer,
                      "data.tokenizer=builtin:demo", f"student.arch={TINY_ARCH}"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_texts"] == 48 and res["n_images"] == 48 and res["scorer"] == scorer
    assert 0 <= res["t2i_r@1"] <= res["t2i_r@5"] <= res["t2i_r@10"] <= 1


def test_inference_api_cached_equals_uncached():
    from dide_scale.inference import DualEncoderInference
    from dide_scale.models.student import DualEncoder
    torch.manual_seed(0)
    m = DualEncoder(SHAPE, "vqa", 16)
    inf = DualEncoderInference(m)
    dense = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    pix = images_from_pixels(dense, 8)
    ids = torch.randint(5, 100, (6, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # padded questions: the [CLS]-only last block must mask the same keys
    mask[4, 3:] = 0
    cache = inf.encode_images(pix)
    with torch.no_grad():  # the [CLS]-only towers equal the full towers' [CLS] state
        pixf = images_from_pixels(dense.float() / 255, 8)
        torch.testing.assert_close(m.encode_image(pixf, cls_only=True)[:, 0], m.encode_image(pixf)[:, 0],
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(m.encode_text(ids, mask, cls_only=True)[:, 0], m.encode_text(ids, mask)[:, 0],
                                   rtol=0, atol=1e-5)
    img_idx = torch.tensor([0, 0, 1, 1, 2, 2])
    cached = inf.predict(inf.encode_texts(ids, mask), cache[img_idx])
    with torch.no_grad():
        full = m(pixf[img_idx], ids, mask).logits
    assert torch.allclose(cached, full, atol=1e-5)
    scores = inf.pair_scores(inf.encode_texts(ids, mask), cache)
    assert scores.shape == (6, 3)


def test_best_on_record_prefers_the_newer_export(tmp_path):
    from dide_scale.trainer import best_on_record
    assert best_on_record(None, tmp_path) is None
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "best.json").write_text(json.dumps({"step": 20, "accuracy": 0.65, "split": "x"}))
    # the final evaluation won after the final checkpoint was written: the state lags the export
    assert best_on_record({"step": 10, "accuracy": 0.6}, tmp_path) == {"step": 20, "accuracy": 0.65}
    assert best_on_record({"step": 30, "accuracy": 0.7}, tmp_path) == {"step": 30, "accuracy": 0.7}
