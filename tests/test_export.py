"""The exported student as a self-contained artifact: copied anywhere, it evaluates and answers
in a fresh process with nothing else, and gives the in-training evaluation's results."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import labelled, tiny_overrides

from dide_scale.data.pipeline import iter_raw_samples
from dide_scale.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(demo_shards, tmp_path_factory):
    """A tiny VQA student distilled from a fusion teacher, evaluated on the dev split."""
    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.saved import save_pretrained
    from dide_scale.models.student import TowerShape
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    shape = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)
    save_pretrained(labelled(FusionEncoder(shape, "vqa", 16)), tmp / "teacher")
    run = tmp / "run"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **{
        "teacher.path": str(tmp / "teacher"), "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0, "loss.soft_label": 1.0,
        "loss.ground_truth": 0.0, "train.eval_every": 2})]) == 0
    return run


def run_fresh(code: str, cwd: Path) -> str:
    """``code`` in a new interpreter, elsewhere, with no run directory in sight."""
    launcher = ("DIDE_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_the_export_holds_everything_needed_to_use_the_model(trained):
    for folder in ("export", "best"):
        d = trained / folder
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "tokenizer.json",
                "tokenizer_config.json"} <= names, (folder, names)
        cfg = json.loads((d / "config.json").read_text())
        from dide_scale.data.demo import ANSWERS
        assert [cfg["id2label"][str(i)] for i in range(16)] == list(ANSWERS)  # the head's order
        pre = json.loads((d / "preprocessor_config.json").read_text())
        assert pre["dide_geometry"] == {"resize": "vilt", "shorter": 32, "longer": 32, "patch": 8}
    card = (trained / "best" / "README.md").read_text()
    best = json.loads((trained / "best" / "best.json").read_text())
    assert "vqa" in card and "teacher" in card and f"at step {best['step']}" in card
    assert f"{best['accuracy']:.4f}" in card and "library_name: dide_scale" in card


def test_a_copied_export_evaluates_and_answers_in_a_fresh_process(trained, demo_shards, tmp_path):
    summary = json.loads((trained / "summary.json").read_text())
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(trained / "export", copy)
    other = tmp_path / "cwd"
    other.mkdir()
    out = run_fresh(f"""
import json
from dide_scale.evaluate import main
main(["--model", {str(copy)!r}, "--shards", {str(demo_shards / 'val' / '00000.tar')!r}, "--vqa-json", "answers.json"])
""", other)
    res = json.loads(out[out.index("{"):])
    assert res["accuracy"] == summary["eval"]["accuracy"] and res["n"] == summary["eval"]["n"]
    by_qid = {str(r["question_id"]): r["answer"] for r in json.loads((other / "answers.json").read_text())}
    # the inference call: JPEG bytes and questions in, answers out, the same as the evaluation's
    raws = list(iter_raw_samples(str(demo_shards / "val" / "00000.tar")))[:6]
    def qid(r):  # as the server format writes it: numeric ids as numbers
        q = str(json.loads(r["json"]).get("question_id", r["__key__"]))
        return str(int(q)) if q.isdigit() else q
    samples = [(r["jpg"], json.loads(r["json"])["question"], qid(r)) for r in raws]
    images = [s[0] for s in samples] + [samples[0][0]]  # the first image twice: encoded once
    questions = [s[1] for s in samples] + ["how many red objects are there ?"]
    out = run_fresh(f"""
import json
from dide_scale.inference import Predictor
p = Predictor.from_pretrained({str(copy)!r})
images = {images!r}
answers = p.answer(images, {questions!r}, top_k=2)
print(json.dumps({{"answers": answers, "cached": len(p.cache)}}))
""", other)
    got = json.loads(out.strip().splitlines()[-1])
    assert got["cached"] == 6
    assert [a[0][0] for a in got["answers"][:6]] == [by_qid[q] for _, _, q in samples]
    assert all(len(a) == 2 and 0 <= a[1][1] <= a[0][1] <= 1 for a in got["answers"])


def test_loads_in_one_call_and_round_trips_through_the_hub_mixin(trained, tmp_path):
    from dide_scale.models.saved import load_pretrained
    from dide_scale.models.student import DualEncoder
    a = DualEncoder.from_pretrained(str(trained / "export"))
    b = load_pretrained(trained / "export")
    assert not a.training and a.labels == b.labels and a.task == "vqa"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    a.save_pretrained(tmp_path / "again")  # the mixin's own save: the same format
    c = DualEncoder.from_pretrained(str(tmp_path / "again"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_consolidation_messages_stay_in_the_log_file(demo_shards, tmp_path, capfd):
    run = tmp_path / "run"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **{"train.max_steps": 2})]) == 0
    out, err = capfd.readouterr()
    assert "Processing zero checkpoint" not in out + err and "Reconstructed fp32 state dict" not in out + err
    assert "Reconstructed fp32 state dict" in (run / "logs" / "rank000.log").read_text()


def test_a_mistyped_key_gets_a_did_you_mean(demo_shards, tmp_path, capsys):
    assert main(["--config", "debug", *tiny_overrides(demo_shards, tmp_path / "r"), "train.max_step=3"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err


def test_shipped_configs_work_from_any_directory(tmp_path, monkeypatch):
    from dide_scale.config import load_config
    from dide_scale.engine import build_ds_config
    monkeypatch.chdir(tmp_path)
    cfg = load_config("pretrain_b32")
    assert cfg.train.ds_config == "ds_configs/zero2.json" and not (tmp_path / "ds_configs").exists()
    assert build_ds_config(cfg, 32)["zero_optimization"]["overlap_comm"] is True
