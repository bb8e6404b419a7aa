"""Label spaces matched by name: a teacher's answer order is its own."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_overrides

from dide_scale.data.demo import ANSWERS
from dide_scale.labels import LabelMap, match_labels, names_from_id2label
from dide_scale.train import main

transformers = pytest.importorskip("transformers")


def vqa_teacher(path, perm: list[int] | None = None):
    """A tiny transformers ViLT VQA teacher for the demo shards (patch 8, 32x32, demo vocabulary);
    with ``perm`` the same function with its answers permuted (classifier rows and id2label)."""
    torch.manual_seed(0)
    cfg = transformers.ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=8, max_position_embeddings=16, vocab_size=128,
                                  initializer_range=0.2, id2label=dict(enumerate(ANSWERS)))
    model = transformers.ViltForQuestionAnswering(cfg).eval()
    if perm is not None:
        last = model.classifier[3]
        with torch.no_grad():
            last.weight.copy_(last.weight[perm].clone())
            last.bias.copy_(last.bias[perm].clone())
        model.config.id2label = {j: ANSWERS[p] for j, p in enumerate(perm)}
        model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(path)
    return path


def history(out) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def distil(shards, out, teacher, *extra):
    return main(["--config", "debug", *tiny_overrides(shards, out, **{
        "teacher.kind": "hf_vilt", "teacher.path": str(teacher), "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0,
        "loss.soft_label": 1.0, "loss.ground_truth": 0.0, "data.val_shards": ""}), *extra])


def test_a_permuted_teacher_gives_identical_losses(demo_shards, tmp_path):
    perm = list(torch.randperm(len(ANSWERS), generator=torch.Generator().manual_seed(3)))
    perm = [int(p) for p in perm]
    a, b = vqa_teacher(tmp_path / "a"), vqa_teacher(tmp_path / "b", perm)
    assert distil(demo_shards, tmp_path / "ra", a) == 0
    assert distil(demo_shards, tmp_path / "rb", b) == 0
    ha, hb = history(tmp_path / "ra"), history(tmp_path / "rb")
    assert len(ha) == len(hb) == 4
    for x, y in zip(ha, hb):
        for k in ("loss/soft_label", "loss/loss"):
            assert abs(x[k] - y[k]) <= 1e-6 * abs(x[k]), (k, x[k], y[k])
    # the check has teeth: read by index (names declared in the wrong order), the losses move
    assert distil(demo_shards, tmp_path / "rc", b, f"teacher.label_names={json.dumps(list(ANSWERS))}") == 0
    hc = history(tmp_path / "rc")
    assert max(abs(x["loss/soft_label"] - z["loss/soft_label"]) / x["loss/soft_label"] for x, z in zip(ha, hc)) > 1e-3


def test_answers_the_teacher_lacks_are_left_out_and_counted(demo_shards, tmp_path):
    import torch.nn.functional as F

    from dide_scale.losses import soft_label_bce
    m = match_labels(["yes", "no", "cat"], ["no", "yes", "dog"], "vqa", min_overlap=0.5)
    assert m.missing == ["cat"] and m.present.tolist() == [True, True, False]
    t = torch.tensor([[1.0, -2.0, 5.0]])  # teacher order: no, yes, dog
    assert torch.equal(m.apply(t), torch.tensor([[-2.0, 1.0, 1.0]]))  # the absent slot's value is never used
    s = torch.tensor([[0.3, -0.1, 9.0]])
    want = F.binary_cross_entropy_with_logits(s[:, :2], torch.sigmoid(m.apply(t)[:, :2]), reduction="sum")
    torch.testing.assert_close(soft_label_bce(s, m.apply(t), 1.0, m.present), want)
    # through a run: the summary is logged and the count reaches TensorBoard
    teacher = tmp_path / "t"
    vqa_teacher(teacher)
    raw = json.loads((teacher / "config.json").read_text())
    raw["id2label"] = {str(i): "off-white" if a == "white" else a for i, a in enumerate(ANSWERS)}
    (teacher / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "run"
    assert distil(demo_shards, out, teacher) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    assert ea.Scalars("labels/teacher_missing")[0].value == 1.0
    assert "15 of the student's 16" in (out / "logs" / "rank000.log").read_text()


def test_too_small_an_overlap_is_refused_before_starting(demo_shards, tmp_path, capsys):
    teacher = vqa_teacher(tmp_path / "t")
    raw = json.loads((teacher / "config.json").read_text())
    raw["id2label"] = {str(i): f"answer {i}" for i in range(16)}
    (teacher / "config.json").write_text(json.dumps(raw))
    assert distil(demo_shards, tmp_path / "run", teacher) == 2
    err = capsys.readouterr().err
    assert "0 of the student's 16 answers" in err and "--answers-from" in err
    assert not (tmp_path / "run").exists()


def test_vqa_without_answers_is_refused_unless_the_demo_tokenizer_is_used(demo_shards, tmp_path, capsys):
    """The demo's 16 answers are the default only beside the demo's own tokenizer: a run with
    any other tokenizer and no data.answer_vocab is refused before anything starts."""
    from dide_scale.data.demo import write_vocab
    vocab = write_vocab(tmp_path / "vocab")
    tok = tmp_path / "tok"  # a real word-piece tokenizer directory, not builtin:demo
    transformers.BertTokenizerFast(vocab_file=str(vocab / "vocab.txt")).save_pretrained(tok)
    argv = ["--config", "debug", *tiny_overrides(demo_shards, tmp_path / "run", **{"data.tokenizer": str(tok)})]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data.answer_vocab" in err and "builtin:demo" in err, err
    assert not (tmp_path / "run").exists()
    argv = ["--config", "debug", *tiny_overrides(demo_shards, tmp_path / "run", **{
        "data.tokenizer": str(tok), "data.answer_vocab": str(vocab / "answers.json"), "train.max_steps": 1})]
    assert main(argv) == 0


def test_classification_labels_are_reordered_or_refused_by_name():
    m = match_labels(["entailment", "neutral", "contradiction"], ["Contradiction", "Entailment", "Neutral"],
                     "snli_ve")
    assert m.index.tolist() == [1, 2, 0] and not m.missing
    assert match_labels(["False", "True"], ["False", "True"], "nlvr2").identity
    with pytest.raises(ValueError, match=r"\['yes', 'no', 'maybe'\].*\['entailment', 'neutral', 'contradiction'\]"):
        match_labels(["entailment", "neutral", "contradiction"], ["yes", "no", "maybe"], "snli_ve")
    with pytest.raises(ValueError, match="teacher.label_names"):
        match_labels(["False", "True"], names_from_id2label({"0": "LABEL_0", "1": "LABEL_1"}), "nlvr2")
    assert isinstance(m, LabelMap)
    # applied every micro-step: the index reaches the logits' device once, not with every call
    logits = torch.randn(4, 3)
    assert torch.equal(m.apply(logits), logits[:, [1, 2, 0]])
    assert m.on(logits.device)[0] is m.on(logits.device)[0]


def test_answers_from_a_teacher_writes_its_order(tmp_path):
    from PIL import Image

    from dide_scale.data.cli import main as data_main
    perm = list(range(16))[::-1]
    teacher = vqa_teacher(tmp_path / "t", perm)
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "img" / "COCO_val2014_000000000001.jpg")
    q = {"questions": [{"image_id": 1, "question": "is there a green square ?", "question_id": 7}]}
    a = {"annotations": [{"question_id": 7, "image_id": 1, "answers": [{"answer": "yes"}] * 10,
                          "multiple_choice_answer": "yes", "answer_type": "yes/no"}]}
    (tmp_path / "q.json").write_text(json.dumps(q))
    (tmp_path / "a.json").write_text(json.dumps(a))
    assert data_main(["vqa", "--questions", str(tmp_path / "q.json"), "--annotations", str(tmp_path / "a.json"),
                      "--images", str(tmp_path / "img"), "--out", str(tmp_path / "out"), "--answers-from",
                      str(teacher), "--no-progress"]) == 0
    assert json.loads((tmp_path / "out" / "answers.json").read_text()) == [ANSWERS[p] for p in perm]
