"""Where the student follows DiDE and ViLT exactly: initialisation from ViLT (modality-type
embeddings, poolers), the NLVR2 attention loss, the head learning rate, ITM soft labels from a
ranking teacher, activation checkpointing, and RandAugment for fine-tuning."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dide_scale import losses
from dide_scale.config import LossConfig, load_config
from dide_scale.models.images import images_from_pixels

transformers = pytest.importorskip("transformers")

ARCH = ("{width: 32, depth: 2, heads: 2, mlp_ratio: 2.0, patch_size: 16, image_size: [64, 64], max_text_len: 12, "
        "vocab_size: 100}")


@pytest.fixture(scope="module")
def vilt_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.ViltConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=64, patch_size=16, max_position_embeddings=12, vocab_size=100,
                                  initializer_range=0.2, num_labels=5)
    d = tmp_path_factory.mktemp("vilt")
    transformers.ViltForQuestionAnswering(cfg).eval().save_pretrained(d)
    return d


def test_vilt_initialised_towers_see_vilts_own_first_block_inputs(vilt_dir):
    """Text: ViLT adds the modality-type embedding after BERT's LayerNorm, so it is folded into
    that LayerNorm's bias; image: into the [CLS] token and the position table.  Each tower's
    first block then sees exactly what ViLT's first block sees for the same text / image, and
    both poolers are ViLT's."""
    from dide_scale.build import build_student
    from dide_scale.models.hf_vilt import HFViltTeacher
    cfg = load_config("debug", [f"student.arch={ARCH}", f"student.init=vilt:{vilt_dir}", "train.task=vqa",
                                "data.num_answers=16"])
    student = build_student(cfg).eval()
    vilt = HFViltTeacher.from_pretrained(vilt_dir, "vqa")
    emb = vilt.vilt.embeddings
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (2, 12), generator=g)
    pixels = torch.zeros(2, 3, 64, 64)
    pmask = torch.zeros(2, 64, 64, dtype=torch.long)
    pixels[0, :, :48, :64], pmask[0, :48, :64] = torch.rand(3, 48, 64, generator=g), 1
    pixels[1], pmask[1] = torch.rand(3, 64, 64, generator=g), 1
    images = images_from_pixels(pixels, 16, pmask)
    with torch.no_grad():
        ours_text = student.text.embeddings(input_ids=ids)
        theirs_text = emb.text_embeddings(input_ids=ids) + emb.token_type_embeddings(torch.zeros_like(ids))
        v = student.image.vit
        ours_img, _ = v.embeds(student.image.normalize(images.patches), patch_coord=images.coord,
                               patch_valid=images.valid)
        theirs_img = vilt.embed_image(images) + emb.token_type_embeddings.weight[1]
    torch.testing.assert_close(ours_text, theirs_text, rtol=0, atol=1e-5)
    valid = images.token_mask()
    torch.testing.assert_close(ours_img[valid], theirs_img[valid], rtol=0, atol=1e-5)
    for pooler in (student.text_pooler, student.image_pooler):
        assert torch.equal(pooler[0].weight, vilt.vilt.pooler.dense.weight)
        assert isinstance(pooler[1], torch.nn.Tanh)


def test_fusion_reads_each_towers_pooler():
    from dide_scale.models.student import DualEncoder, TowerShape
    torch.manual_seed(0)
    m = DualEncoder(TowerShape(width=16, depth=1, heads=2, patch_size=8, image_size=[16, 16], max_text_len=8,
                               vocab_size=50), "vqa", 4).eval()
    images = images_from_pixels(torch.rand(2, 3, 16, 16), 8)
    ids = torch.randint(5, 50, (2, 8))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        t = torch.tanh(m.text_pooler[0](m.encode_text(ids, mask)[:, 0]))
        i = torch.tanh(m.image_pooler[0](m.encode_image(images)[:, 0]))
        torch.testing.assert_close(m(images, ids, mask).logits, m.head(m.fusion(torch.cat([t, i], -1))))


def test_nlvr2_attention_loss_is_the_sum_of_both_passes():
    from dide_scale.models.attention import CrossQK
    g = torch.Generator().manual_seed(0)

    def qk():
        return CrossQK(*(torch.randn(2, 2, n, 4, generator=g) for n in (5, 5, 7, 7)),
                       torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool))
    t, s = [qk(), qk()], [qk(), qk()]
    both = losses.cross_attention_losses(t, s, "per_head")
    one = [losses.cross_attention_losses([a], [b], "per_head") for a, b in zip(t, s)]
    for k in range(2):
        torch.testing.assert_close(both[k], one[0][k] + one[1][k])


@pytest.mark.parametrize("kind", ["dual", "fusion"])
def test_head_lr_multiplier_reaches_the_task_head_only(kind):
    from dide_scale.build import build_student
    from dide_scale.engine import param_groups
    cfg = load_config("debug", [f"student.kind={kind}", "optim.head_lr_mult=10"])
    model = build_student(cfg)
    groups = param_groups(model, 1.0, 0.01, model.head_parameters(), 10.0)
    fast = {id(p) for gr in groups if gr["lr"] == 10.0 for p in gr["params"]}
    assert fast == {id(p) for p in model.head.parameters()}
    others = model.fusion.parameters() if kind == "dual" else model.pooler.parameters()
    assert not any(id(p) in fast for p in others)


def naive_listwise(s_logits, t_scores, T):
    """Loops: per anchor, KL between softmax over (positive, negative) teacher and student scores."""
    n = t_scores.shape[0] // 3
    s = s_logits[:, 1] - s_logits[:, 0]
    t = t_scores[:, 0]
    total = 0.0
    for anchor in range(2 * n):
        i = anchor % n
        neg = n + i if anchor < n else 2 * n + i  # text anchors: negative image rows; image anchors: negative texts
        pt = torch.softmax(torch.stack([t[i], t[neg]]) / T, 0)
        ps = torch.softmax(torch.stack([s[i], s[neg]]) / T, 0)
        total += float((pt * (pt.log() - ps.log())).sum())
    return total / (2 * n) * T * T


def test_itm_soft_labels_from_a_ranking_teacher_are_per_anchor_distributions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(9, 2, generator=g), torch.randn(9, 1, generator=g)
    got = losses.itm_listwise_kl(s, t, 2.0)
    assert got.item() == pytest.approx(naive_listwise(s, t, 2.0), rel=1e-5)
    # a constant shift of the ranking score means nothing: the loss does not move
    torch.testing.assert_close(losses.itm_listwise_kl(s, t + 7.0, 2.0), got)
    # the per-pair reading it replaces would have moved
    pair = losses.soft_label_kl(s, torch.cat([-t / 2, t / 2], -1))
    shifted = losses.soft_label_kl(s, torch.cat([-(t + 7) / 2, (t + 7) / 2], -1))
    assert abs(pair - shifted) > 1e-2


def test_distill_task_picks_the_itm_form_of_its_teacher():
    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.student import TowerShape
    from dide_scale.objective import DistillObjective
    shape = TowerShape(width=16, depth=1, heads=2, patch_size=8, image_size=[16, 16], max_text_len=8, vocab_size=50)
    torch.manual_seed(0)
    student, teacher = FusionEncoder(shape, "itm", 2), FusionEncoder(shape, "itm", 2).eval()
    obj = DistillObjective(student, teacher, LossConfig(attn_t2i=0, attn_i2t=0, soft_label=1.0), "itm")
    assert obj.itm_form == "pair"
    s, t = torch.randn(6, 2), torch.randn(6, 2)
    torch.testing.assert_close(obj.soft_label_loss(s, t), losses.soft_label_kl(s, t))
    teacher = FusionEncoder(shape, "itm", 1).eval()  # a retrieval checkpoint's one ranking score
    obj = DistillObjective(student, teacher, LossConfig(attn_t2i=0, attn_i2t=0, soft_label=1.0), "itm")
    assert obj.itm_form == "rank"
    torch.testing.assert_close(obj.soft_label_loss(s, t[:, :1]), losses.itm_listwise_kl(s, t[:, :1]))


def test_image_tower_checkpointing_is_non_reentrant_and_exact():
    """Non-reentrant checkpointing works with torch.autograd.grad (reentrant does not) and gives
    the gradients of the plain forward."""
    from dide_scale.models.student import ImageTower, TowerShape
    torch.manual_seed(0)
    tower = ImageTower(TowerShape(width=16, depth=2, heads=2, patch_size=8, image_size=[16, 16]))
    images = images_from_pixels(torch.rand(2, 3, 16, 16), 8)
    params = list(tower.parameters())
    plain = torch.autograd.grad(tower(images).square().sum(), params, allow_unused=True)
    tower.set_grad_checkpointing(True)
    ckpt = torch.autograd.grad(tower(images).square().sum(), params, allow_unused=True)
    for a, b in zip(plain, ckpt):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_randaugment_is_seeded_by_the_sample_position_and_resumes(demo_shards):
    from dide_scale.data.pipeline import build_loader
    base = ["data.image_shorter=32", "data.image_longer=32", "data.num_workers=0",
            f"data.train_shards={demo_shards}/train/{{00000..00003}}.tar", "data.tokenizer=builtin:demo",
            "train.task=vqa", "data.num_answers=16", "train.micro_batch_size=4", "train.global_batch_size=4"]
    aug = load_config("debug", base + ["data.randaugment_ops=2", "data.randaugment_magnitude=9"])
    plain = load_config("debug", base)

    def take(cfg, n, state=None):
        loader = build_loader(cfg)
        if state is not None:
            loader.load_state_dict(state)
        out = []
        for b in loader:
            out.append(b["patches"].clone())
            if len(out) == n:
                return out, json.loads(json.dumps(loader.state_dict()))
    full, _ = take(aug, 5)
    again, _ = take(aug, 5)
    assert all(torch.equal(a, b) for a, b in zip(full, again))  # a pure function of the position
    head, state = take(aug, 2)
    tail, _ = take(aug, 3, state)
    assert all(torch.equal(a, b) for a, b in zip(full, head + tail))  # exact after a resume
    ref, _ = take(plain, 5)
    assert sum(not torch.equal(a, b) for a, b in zip(full, ref)) >= 4  # it does augment
    # evaluation is never augmented
    val = load_config("debug", base + ["data.randaugment_ops=2", f"data.val_shards={demo_shards}/val/00000.tar"])
    plain_val = load_config("debug", base + [f"data.val_shards={demo_shards}/val/00000.tar"])
    assert torch.equal(next(iter(build_loader(val, "val")))["patches"],
                       next(iter(build_loader(plain_val, "val")))["patches"])


@pytest.mark.parametrize("name,on", [("finetune_vqa", True), ("finetune_nlvr2", True), ("finetune_snli_ve", True),
                                     ("finetune_retrieval_flickr", True), ("finetune_retrieval_coco", True),
                                     ("pretrain_b32", False)])
def test_randaugment_is_on_in_fine_tuning_presets_only(name, on):
    cfg = load_config(name)
    assert (cfg.data.randaugment_ops, cfg.data.randaugment_magnitude) == ((2, 9) if on else (0, 9))


def test_aspect_ratio_rule_matches_vilt():
    from dide_scale.data.transforms import Geometry, vilt_size
    assert vilt_size(480, 640, 384, 639, 32) == (384, 512)       # 4:3 landscape
    assert vilt_size(640, 480, 384, 639, 32) == (512, 384)       # portrait: long side vertical
    assert vilt_size(600, 1000, 384, 639, 32) == (352, 608)      # 5:3: capped by 639, as transformers does
    assert vilt_size(600, 1000, 384, 640, 32) == (384, 640)      # the paper's rounded 640 would keep 384
    assert vilt_size(100, 10000, 384, 639, 32) == (32, 608)      # never below one patch
    assert Geometry("vilt", 384, 639, 32).max_patches == 12 * 19
    assert Geometry("stretch", 384, 640, 32).output_size(100, 50) == (384, 640)
    assert F is not None
