"""ViLT's own checkpoints (dandelin/ViLT's Lightning .ckpt layout) as teachers and inits.

Parity: a native checkpoint written from a transformers ViLT (``native_vilt.native_state``, the
inverse of transformers' conversion, written independently of the project's mapping), read
through the project's shard reader, decoder and the native loader, gives the logits of
``ViltProcessor`` + transformers' model on the same JPEG bytes and text, for every head
transformers has (VQA, SNLI-VE, NLVR2 with three token types, retrieval); the ITM head, which
transformers has no class for, gives what its weights compute from transformers' own pooled
[CLS].  Safety: the files are read without running their pickle; an unknown global is refused
by name and never runs.
"""
from __future__ import annotations

import json
import pickle
import sys

import pytest
import torch
from native_vilt import importable, native_state, vilt_config, write_lightning_ckpt
from PIL import Image
from test_vilt_parity import (
    LONGER,
    SHORTER,
    TASKS,
    TEXTS,
    logits_through_data_path,
    rel_err,
    theirs,
    world,  # noqa: F401 (the fixture)
)

from dide_scale.build import build_student, build_teacher
from dide_scale.config import load_config
from dide_scale.models.vilt_native import UnsafeCheckpoint, ViltCheckpoint, read_checkpoint

transformers = pytest.importorskip("transformers")

HEAD = {"vqa": "vqa", "snli_ve": "vqa", "nlvr2": "nlvr2", "itm": None}
GROUND_TRUTH = ["loss.attn_t2i=0", "loss.attn_i2t=0", "loss.soft_label=0", "loss.ground_truth=1"]
ARCH = ("{width: 32, depth: 2, heads: 2, patch_size: 16, image_size: [64, 64], max_text_len: 16, "
        "vocab_size: 64}")
# the parity checkpoints' own shape (MLP ratio 2, the 35-token test vocabulary): what an init must match
INIT_ARCH = ARCH.replace("vocab_size: 64", "vocab_size: 35").replace("heads: 2,", "heads: 2, mlp_ratio: 2.0,")


@pytest.fixture(scope="module")
def natives(world):  # noqa: F811
    """Per task: a .ckpt of ViLT's layout from the parity fixture's transformers model (the
    retrieval model also gets an ``itm_score.fc`` head, as ViLT's retrieval files have), and the
    label files ViLT ships beside them."""
    root = world["root"]
    out = {}
    for task in TASKS:
        model = getattr(transformers, TASKS[task]).from_pretrained(world[task]).eval()
        sd = native_state(model, HEAD[task])
        if task == "itm":
            g = torch.Generator().manual_seed(7)
            sd["itm_score.fc.weight"] = torch.randn(2, 32, generator=g)
            sd["itm_score.fc.bias"] = torch.randn(2, generator=g)
        write_lightning_ckpt(root / f"{task}.ckpt", sd, vilt_config(model))
        if task != "itm":
            names = {str(k): v for k, v in model.config.id2label.items()}
            (root / f"{task}_labels.json").write_text(json.dumps(names))
        out[task] = root / f"{task}.ckpt"
    return out


def overrides(world, task, ckpt, *extra) -> list[str]:  # noqa: F811
    root = world["root"]
    labels = [f"teacher.label_file={root}/{task}_labels.json"] if task in ("vqa", "snli_ve") else []
    return [f"train.task={task}", f"data.val_shards={root}/{task}_shards/00000.tar",
            f"data.tokenizer={world[task]}", f"data.image_shorter={SHORTER}", f"data.image_longer={LONGER}",
            "data.num_workers=0", f"data.answer_vocab={root}/answers.json", "data.num_answers=6",
            f"student.arch={ARCH}", "loss.attn_t2i=0", "loss.attn_i2t=0", "loss.soft_label=1",
            "teacher.kind=vilt_ckpt", f"teacher.path={ckpt}", *labels, *extra]


def native_logits(world, task, ckpt, batch_size, *extra) -> torch.Tensor:  # noqa: F811
    """The native teacher's logits through the project's data path, in shard order."""
    cfg = load_config(None, overrides(world, task, ckpt, *extra))
    return logits_through_data_path(cfg, build_teacher(cfg), batch_size)


@pytest.mark.parametrize("task", ["vqa", "snli_ve", "nlvr2", "itm"])
def test_native_checkpoint_gives_transformers_logits_per_head(world, natives, task):  # noqa: F811
    """itm here is the retrieval head (rank_output), the one transformers has."""
    n = len(world["jpegs"])
    ref = torch.cat([theirs(world, task, [i]) for i in range(n)])
    single = native_logits(world, task, natives[task], 1)
    batched = native_logits(world, task, natives[task], n)
    assert single.shape == ref.shape
    assert rel_err(single, ref) <= 1e-4, (single, ref)
    assert rel_err(batched, theirs(world, task, list(range(n)))) <= 1e-4
    assert (ref - ref.mean(0)).abs().max() / ref.abs().max() > 1e-2  # the logits depend on the photo


def test_itm_head_equals_its_weights_on_transformers_pooled_cls(world, natives):  # noqa: F811
    """ViLT's pre-training ITM head (itm_score.fc, absent from every transformers class) against
    an independent reference: transformers' ViltModel pooler output on ViltProcessor's inputs,
    times the head's weights."""
    n = len(world["jpegs"])
    ours = native_logits(world, "itm", natives["itm"], n, "teacher.itm_head=itm")
    proc = transformers.ViltProcessor.from_pretrained(world["itm"])
    vilt = transformers.ViltModel.from_pretrained(world["itm"], add_pooling_layer=True).eval()
    sd = ViltCheckpoint.read(natives["itm"]).state
    import io
    refs = []
    with torch.no_grad():
        for i in range(n):
            enc = proc(images=[Image.open(io.BytesIO(world["jpegs"][i]))], text=[TEXTS[i]], return_tensors="pt")
            pooled = vilt(**enc).pooler_output
            refs.append(pooled @ sd["itm_score.fc.weight"].T + sd["itm_score.fc.bias"])
    ref = torch.cat(refs)
    assert ours.shape == (n, 2)
    assert rel_err(ours, ref) <= 1e-4, (ours, ref)
    # 'auto' picks the retrieval head of a file that has both; it is another function
    auto = native_logits(world, "itm", natives["itm"], n)
    assert auto.shape == (n, 1)


def test_native_teacher_is_the_paper_teacher_of_each_task(world, natives):  # noqa: F811
    """Shapes and heads read from the file: ITM pair form from itm_score, NLVR2's three token
    types, VQA label names from ViLT's vqa_dict-style file, in the head's order."""
    cfg = load_config(None, overrides(world, "itm", natives["itm"], "teacher.itm_head=itm"))
    t = build_teacher(cfg)
    assert (t.task, t.num_classes, t.itm_form, t.shape.width, t.shape.depth, t.shape.heads) == \
        ("itm", 2, "pair", 32, 2, 2)
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    t = build_teacher(load_config(None, overrides(world, "nlvr2", natives["nlvr2"])))
    sd = ViltCheckpoint.read(natives["nlvr2"]).state
    assert sd["token_type_embeddings.weight"].shape[0] == 3
    assert torch.equal(t.token_type.weight, sd["token_type_embeddings.weight"])
    t = build_teacher(load_config(None, overrides(world, "vqa", natives["vqa"])))
    assert t.labels == ["yes", "no", "cat", "blue", "two", "coffee"]


def test_missing_head_names_and_heads_are_refused_clearly(world, natives, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match=r"no vqa_classifier head for train.task='vqa'.*itm, rank"):
        build_teacher(load_config(None, overrides(world, "vqa", natives["itm"])))
    unnamed = [o for o in overrides(world, "vqa", natives["vqa"]) if not o.startswith("teacher.label_file")]
    with pytest.raises(ValueError, match="has no label names.*teacher.label_file"):
        from dide_scale.labels import label_map_for
        label_map_for(load_config(None, unnamed))
    # no hyper-parameters: the head count cannot be read from a fused qkv
    ck = ViltCheckpoint.read(natives["vqa"])
    write_lightning_ckpt(tmp_path / "bare.ckpt", ck.state, None)
    with pytest.raises(ValueError, match="not divisible by 12 heads.*teacher.arch.heads"):
        build_teacher(load_config(None, overrides(world, "vqa", tmp_path / "bare.ckpt")))
    t = build_teacher(load_config(None, overrides(world, "vqa", tmp_path / "bare.ckpt", "teacher.arch.heads=4")))
    assert t.shape.heads == 4
    with pytest.raises(ValueError, match="6 outputs but 3 label names"):
        build_teacher(load_config(None, [*unnamed, "teacher.label_names=[a, b, c]"]))


def test_lightning_file_is_read_without_lightning(natives):
    """hyper_parameters pickled as Lightning's AttributeDict come back as a plain dict, and
    nothing named pytorch_lightning is imported to read them."""
    assert "pytorch_lightning" not in sys.modules
    ckpt = read_checkpoint(natives["vqa"])
    hp = ckpt["hyper_parameters"]
    assert type(hp) is dict and hp["config"]["num_heads"] == 2 and ckpt["global_step"] == 200000
    # Lightning 1.x keys callback states by the callback class: read as its name, never imported
    (state,) = ckpt["callbacks"].values()
    assert list(ckpt["callbacks"]) == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    assert state["monitor"] == "val/the_metric"
    assert "pytorch_lightning" not in sys.modules
    assert isinstance(ckpt["state_dict"]["transformer.pos_embed"], torch.Tensor)


def test_a_truncated_checkpoint_fails_with_one_line(natives, tmp_path):
    data = natives["vqa"].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.ckpt: cannot be read as a checkpoint.*complete") as e:
        ViltCheckpoint.read(tmp_path / "cut.ckpt")
    assert "\n" not in str(e.value)


class _SacredDict(dict):
    """sacred's ReadOnlyDict pickles as (cls, (dict(self),))."""

    def __reduce__(self):
        return self.__class__, (dict(self),)


class _OldAttributeDict(dict):
    """What older Pythons pickled for an AttributeDict: NEWOBJ, an empty instance-__dict__ state
    (BUILD {}), then the items."""

    def __reduce_ex__(self, protocol):
        import copyreg
        return copyreg.__newobj__, (type(self),), {}, None, iter(self.items())


def test_known_containers_of_older_files_read_as_plain(tmp_path):
    for cls, name in ((_SacredDict, "sacred.config.custom_containers.ReadOnlyDict"),
                      (_OldAttributeDict, "pytorch_lightning.utilities.parsing.AttributeDict")):
        with importable(name, cls):
            torch.save({"hyper_parameters": cls(config={"num_heads": 3}), "w": torch.ones(2)}, tmp_path / "f.ckpt")
        assert name.split(".")[0] not in sys.modules
        got = read_checkpoint(tmp_path / "f.ckpt")
        assert type(got["hyper_parameters"]) is dict and got["hyper_parameters"]["config"] == {"num_heads": 3}


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_pickle_names_an_unknown_global_is_refused(natives, tmp_path, demo_shards, capsys):
    """The pickle would run os.system: refused naming that global, through the loader and through
    dide-pretrain (exit 2, one line, no run directory), and the command never runs."""
    from conftest import tiny_overrides

    from dide_scale.train import main
    marker = tmp_path / "ran"
    sd = ViltCheckpoint.read(natives["vqa"]).state
    torch.save({"state_dict": sd, "hyper_parameters": _RunsCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpoint, match="the global posix.system|the global os.system") as e:
        read_checkpoint(tmp_path / "evil.ckpt")
    assert isinstance(e.value, pickle.UnpicklingError)
    run = tmp_path / "run"
    argv = ["--config", "debug", *tiny_overrides(demo_shards, run), "teacher.kind=vilt_ckpt",
            f"teacher.path={tmp_path / 'evil.ckpt'}", "loss.soft_label=1.0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher.path" in err[0] and "system" in err[0] and "refused" in err[0], err
    assert not marker.exists() and not run.exists()
    for init in (f"vilt:{tmp_path / 'evil.ckpt'}",):
        assert main(["--config", "debug", *tiny_overrides(demo_shards, run), f"student.init={init}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "student.init" in err[0] and "system" in err[0]
    assert not marker.exists()


def test_student_init_from_native_equals_init_from_transformers(world, natives):  # noqa: F811
    """vilt:FILE.ckpt and vilt:DIR (the same weights in two layouts) give the same dual-encoder
    student, and the same fusion student body."""
    base = ["train.task=vqa", "data.num_answers=6", f"data.answer_vocab={world['root']}/answers.json",
            f"student.arch={INIT_ARCH}", *GROUND_TRUTH]
    for kind in ("dual", "fusion"):
        a = build_student(load_config(None, [*base, f"student.kind={kind}", f"student.init=vilt:{natives['vqa']}"]))
        b = build_student(load_config(None, [*base, f"student.kind={kind}", f"student.init=vilt:{world['vqa']}"]))
        sa, sb = a.state_dict(), b.state_dict()
        body = [k for k in sa if not k.startswith(("head.", "fusion.", "itc_", "logit_scale"))]
        assert body and all(torch.equal(sa[k], sb[k]) for k in body), [k for k in body if not torch.equal(sa[k], sb[k])]


def test_fusion_student_from_vilt_computes_vilts_pooled_state(world, natives):  # noqa: F811
    """A fusion student initialised from a ViLT checkpoint is that ViLT up to its fresh head:
    its pooled [CLS] equals the native teacher's (and so transformers')."""
    from dide_scale.models.images import images_from_pixels
    cfg = load_config(None, ["train.task=snli_ve", "student.kind=fusion", f"student.arch={INIT_ARCH}",
                             f"student.init=vilt:{natives['vqa']}", *GROUND_TRUTH])
    student = build_student(cfg).eval()
    teacher = build_teacher(load_config(None, overrides(world, "vqa", natives["vqa"])))
    g = torch.Generator().manual_seed(0)
    images = images_from_pixels(torch.rand(2, 3, 64, 48, generator=g), 16)
    ids, mask = torch.randint(5, 35, (2, 9), generator=g), torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(student.joint(images, ids, mask)[0], teacher.joint(images, ids, mask)[0],
                                   rtol=0, atol=1e-6)
    assert student.head[-1].out_features == 3  # SNLI-VE's head, fresh
