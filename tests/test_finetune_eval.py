"""Pre-train (ITM) -> export -> fine-tune on each demo task -> evaluate, end to end."""
import json

import pytest
import torch

from conftest import TINY_ARCH, tiny_overrides
from dide_scale.data.demo import generate_split
from dide_scale.evaluate import main as eval_main, retrieval_recall
from dide_scale.finetune import main as finetune_main
from dide_scale.models.build import load_pretrained, save_pretrained
from dide_scale.models.fusion import FusionEncoder
from dide_scale.models.student import TowerShape
from dide_scale.train import main as pretrain_main

SHAPE = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)


@pytest.fixture(scope="module")
def pretrained(demo_shards, tmp_path_factory):
    """A tiny ITM distillation pre-training run (teacher: a random fusion ITM model)."""
    root = tmp_path_factory.mktemp("pre")
    torch.manual_seed(0)
    save_pretrained(FusionEncoder(SHAPE, "itm", 2), root / "teacher")
    run = root / "run"
    assert pretrain_main(["--config", "debug", *tiny_overrides(demo_shards, run, **{
        "train.task": "itm", "teacher.path": str(root / "teacher"), "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0,
        "loss.soft_label": 1.0, "loss.ground_truth": 1.0, "loss.itc": 1.0, "data.val_shards": ""})]) == 0
    hist = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(k in hist[-1] for k in ("loss/itc", "loss/attn_t2i", "loss/soft_label", "loss/ground_truth"))
    return run / "export"


@pytest.mark.parametrize("task, n_cls", [("vqa", 16), ("nlvr2", 2), ("snli_ve", 3)])
def test_finetune_from_pretrained_export_then_eval(pretrained, tmp_path, task, n_cls):
    data = tmp_path / "data"
    generate_split(data / "train", 64, 0, task, samples_per_shard=32)
    generate_split(data / "val", 24, 1, task, samples_per_shard=32)
    torch.manual_seed(1)
    save_pretrained(FusionEncoder(SHAPE, task, n_cls), tmp_path / "teacher")
    run = tmp_path / "ft"
    ov = tiny_overrides(data, run, **{
        "train.task": task, "student.init": f"export:{pretrained}", "teacher.path": str(tmp_path / "teacher"),
        "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0, "loss.soft_label": 1.0, "loss.ground_truth": 0.0,
        "data.train_shards": f"{data}/train/{{00000..00001}}.tar", "data.val_shards": f"{data}/val/00000.tar",
        "optim.head_lr_mult": 10.0})
    assert finetune_main(["--config", "debug", *ov]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["n"] == 24 and 0 <= summary["eval"]["accuracy"] <= 1
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


def test_lr_schedule_counts_optimizer_steps_under_accumulation():
    from dide_scale.engine import lr_lambda
    f = lr_lambda(max_steps=100, warmup_fraction=0.1, min_ratio=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(100) == pytest.approx(0.0)
    assert f(55) == pytest.approx(0.5)


def test_retrieval_recall():
    t = torch.eye(4)
    i = torch.eye(4)
    r = retrieval_recall(t, i, ks=(1,))
    assert r["t2i_r@1"] == 1.0 and r["i2t_r@1"] == 1.0
    r = retrieval_recall(t, i.roll(1, 0), ks=(1, 5))
    assert r["t2i_r@1"] == 0.0 and r["t2i_r@5"] == 1.0


def test_inference_api_cached_equals_uncached():
    from dide_scale.inference import DualEncoderInference
    from dide_scale.models.student import DualEncoder
    torch.manual_seed(0)
    m = DualEncoder(SHAPE, "vqa", 16)
    inf = DualEncoderInference(m)
    pix = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    ids = torch.randint(5, 100, (6, 16))
    mask = torch.ones_like(ids)
    cache = inf.encode_images(pix)
    img_idx = torch.tensor([0, 0, 1, 1, 2, 2])
    cached = inf.predict(inf.encode_texts(ids, mask), cache[img_idx])
    with torch.no_grad():
        full = m(pix[img_idx].float() / 255, ids, mask).logits
    assert torch.allclose(cached, full, atol=1e-5)
    scores = inf.pair_scores(inf.encode_texts(ids, mask), cache)
    assert scores.shape == (6, 3)
