"""Hugging Face Hub ids in teacher.path, student.init and data.tokenizer (models.sources): a
local path wins, an id resolves to its snapshot in the local Hub cache (as huggingface_hub reads
it offline; tests never reach the network), and an id the Hub cannot give fails with one line
naming the key."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import put_in_hub_cache, tiny_overrides

from dide_scale.build import build_student, build_teacher
from dide_scale.config import load_config
from dide_scale.data.transforms import load_tokenizer
from dide_scale.models import sources
from dide_scale.train import main

transformers = pytest.importorskip("transformers")
ARCH = "{width: 32, depth: 2, heads: 2, patch_size: 8, image_size: [32, 32], max_text_len: 16, vocab_size: 128}"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hub cache holding lab/tiny-vilt (a transformers ViLT VQA model with its tokenizer)."""
    from huggingface_hub import constants

    from dide_scale.data.demo import write_vocab
    src = tmp_path / "src"
    torch.manual_seed(0)
    cfg = transformers.ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                                  image_size=32, patch_size=8, max_position_embeddings=16, vocab_size=128,
                                  id2label={i: f"a{i}" for i in range(16)})
    transformers.ViltForQuestionAnswering(cfg).eval().save_pretrained(src)
    transformers.BertTokenizerFast.from_pretrained(str(write_vocab(tmp_path / "vocab"))).save_pretrained(src)
    cache = tmp_path / "hub"
    snap = put_in_hub_cache(cache, "lab/tiny-vilt", src)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sources._resolve_cached.cache_clear()
    yield {"snapshot": snap, "src": src}
    sources._resolve_cached.cache_clear()


def test_hub_ids_resolve_to_the_cached_snapshot_for_every_key(hub, tmp_path):
    assert sources.resolve_source("lab/tiny-vilt", "teacher.path") == str(hub["snapshot"])
    base = ["train.task=vqa", "data.num_answers=16", f"student.arch={ARCH}", "loss.attn_t2i=1", "loss.attn_i2t=1",
            "loss.soft_label=0"]
    teacher = build_teacher(load_config(None, [*base, "teacher.kind=hf_vilt", "teacher.path=lab/tiny-vilt"]))
    assert teacher.task == "vqa" and teacher.width == 32
    alone = ["train.task=vqa", "data.num_answers=16", "data.tokenizer=builtin:demo", f"student.arch={ARCH}",
             "loss.attn_t2i=0", "loss.attn_i2t=0",
             "loss.soft_label=0", "loss.ground_truth=1"]
    by_id = build_student(load_config(None, [*alone, "student.init=vilt:lab/tiny-vilt"]))
    by_dir = build_student(load_config(None, [*alone, f"student.init=vilt:{hub['src']}"]))
    assert all(torch.equal(a, b) for a, b in zip(by_id.image.parameters(), by_dir.image.parameters()))
    tok = load_tokenizer("lab/tiny-vilt")
    assert tok("a red circle")["input_ids"] == load_tokenizer(str(hub["src"]))("a red circle")["input_ids"]
    # the answer order of a Hub teacher for dide-data vqa --answers-from
    from dide_scale.data.cli import teacher_answers
    assert teacher_answers("lab/tiny-vilt") == [f"a{i}" for i in range(16)]


def test_a_local_path_wins_over_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "tiny-vilt").symlink_to(hub["src"])

    def no_hub(*a):
        raise AssertionError("the Hub was asked for a path that exists locally")
    monkeypatch.setattr(sources, "download", no_hub)
    sources._resolve_cached.cache_clear()
    assert sources.resolve_source("lab/tiny-vilt", "teacher.path") == "lab/tiny-vilt"
    assert sources.split_init("vilt:lab/tiny-vilt") == ("vilt", "lab/tiny-vilt")


@pytest.mark.parametrize("override,key", [
    ("teacher.path=lab/tiny-vilt-typo", "teacher.path"),
    ("student.init=vilt:lab/no-such-vilt", "student.init"),
    ("data.tokenizer=lab/no-such-tokenizer", "data.tokenizer")])
def test_an_id_the_hub_cannot_give_fails_with_one_line_naming_the_key(hub, demo_shards, tmp_path, capsys, override,
                                                                      key):
    extra = ["teacher.kind=hf_vilt", "loss.soft_label=1.0", "data.num_answers=16"] if key == "teacher.path" else []
    run = tmp_path / "run"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run), *extra, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    value = override.split("=", 1)[1].removeprefix("vilt:")
    assert f"{key}=" in err[0] and value in err[0] and "Hugging Face Hub" in err[0], err
    assert not run.exists()


def test_values_that_are_no_hub_id_are_left_to_their_reader(tmp_path):
    for value in (str(tmp_path / "missing"), "./relative/missing", "pretrained/vilt_vqa.ckpt", "a/b/c"):
        assert sources.resolve_source(value, "teacher.path") == value
    assert sources.hub_id("dandelin/vilt-b32-mlm@v1") == ("dandelin/vilt-b32-mlm", "v1")
    assert sources.hub_id("bert-base-uncased") == ("bert-base-uncased", None)
    assert json.dumps(sources.TOKENIZER_FILES)
