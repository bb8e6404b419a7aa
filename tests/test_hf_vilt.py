"""HFViltTeacher: a transformers ViLT checkpoint directory as the frozen teacher (tiny, CPU)."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForImagesAndTextClassification,
    ViltForQuestionAnswering,
    ViltModel,
)

from dide_scale.models.attention import t2i_i2t  # noqa: E402
from dide_scale.models.hf_vilt import HFViltTeacher  # noqa: E402
from dide_scale.models.images import images_from_pixels  # noqa: E402

B, NT = 3, 7


def tiny_config(**kw) -> ViltConfig:
    args = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                image_size=64, patch_size=16, max_position_embeddings=12, vocab_size=100, num_labels=5)
    args.update(kw)
    return ViltConfig(**args)


def save(model, path):
    torch.manual_seed(0)
    model.eval()
    model.save_pretrained(path)
    return path


def inputs(h=64, w=64, seed=1, patch=16):
    """(Images, input_ids, attention_mask): B random images of h x w, all patches valid."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(B, 3, h, w, generator=g)
    input_ids = torch.randint(1, 100, (B, NT), generator=g)
    mask = torch.ones(B, NT, dtype=torch.long)
    mask[0, 4:] = 0  # padded rows
    mask[2, 6:] = 0
    input_ids = input_ids * mask
    return images_from_pixels(pixels, patch), input_ids, mask


def canvas(seed=2):
    """A ViLT-style padded batch: three images of different shapes (64x48, 32x80, 80x80) top-left
    on an 80x80 canvas, with ``pixel_mask``; and the same batch as Images."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.zeros(B, 3, 80, 80)
    pmask = torch.zeros(B, 80, 80, dtype=torch.long)
    for i, (h, w) in enumerate([(64, 48), (32, 80), (80, 80)]):
        pixels[i, :, :h, :w] = torch.rand(3, h, w, generator=g)
        pmask[i, :h, :w] = 1
    return pixels, pmask, images_from_pixels(pixels, 16, pmask)


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory):
    torch.manual_seed(0)
    return save(ViltForQuestionAnswering(tiny_config()), tmp_path_factory.mktemp("vqa"))


def renorm(p: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    p = p * key_mask[:, None, None, :].to(p.dtype)
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("tap_layer", [-1, 0])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_cross_attention_and_logits_match_transformers(vqa_dir, tap_layer, size):
    teacher = HFViltTeacher.from_pretrained(vqa_dir, "vqa", tap_layer=tap_layer)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert (teacher.num_heads, teacher.width, teacher.depth, teacher.patch_size) == (2, 32, 2, 16)
    assert (teacher.task, teacher.num_classes, teacher.vocab_size) == ("vqa", 5, 100)

    images, ids, mask = inputs(*size)
    with torch.no_grad():
        out = teacher(images, ids, mask, capture=True)
        logits, qks = out.logits, out.qk
        plain = teacher(images, ids, mask)
        logits_nocap, none = plain.logits, plain.qk
    assert none == [] and len(qks) == 1
    torch.testing.assert_close(logits, logits_nocap, rtol=0, atol=0)
    qk = qks[0]
    n_img = 1 + (size[0] // 16) * (size[1] // 16)
    assert qk.q_text.shape == (B, 2, NT, 16) and qk.k_image.shape == (B, 2, n_img, 16)
    assert torch.equal(qk.text_mask, mask.bool()) and qk.image_mask.all()
    t2i, i2t = t2i_i2t(qk)

    ref = ViltForQuestionAnswering.from_pretrained(vqa_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        image_embeds = teacher.embed_image(images)
        pixel_mask = torch.ones(B, 1, n_img, dtype=torch.long)
        out = ref(input_ids=ids, attention_mask=mask, image_embeds=image_embeds, pixel_mask=pixel_mask,
                  output_attentions=True)
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=1e-6)

    att = out.attentions[teacher.tap_layer]  # [B, H, NT+n_img, NT+n_img]
    assert att.shape[-1] == NT + n_img
    ref_t2i = renorm(att[:, :, :NT, NT:], torch.ones(B, n_img))
    ref_i2t = renorm(att[:, :, NT:, :NT], mask)
    valid_text = mask.bool()[:, None, :, None].expand_as(ref_t2i)
    torch.testing.assert_close(t2i.exp()[valid_text], ref_t2i[valid_text], rtol=0, atol=1e-5)
    torch.testing.assert_close(i2t.exp(), ref_i2t, rtol=0, atol=1e-5)  # every image row is valid
    # padded text keys get no mass
    assert i2t.exp()[0, :, :, 4:].max() < 1e-6


def test_padded_batch_of_mixed_shapes_gives_transformers_own_logits(vqa_dir):
    """Images of three shapes on one canvas: our patch sequences (padding masked) give the
    logits of transformers' own pixel_values + pixel_mask path, and padded patches get no
    attention."""
    teacher = HFViltTeacher.from_pretrained(vqa_dir, "vqa")
    pixels, pmask, images = canvas()
    _, ids, mask = inputs()
    ref = ViltForQuestionAnswering.from_pretrained(vqa_dir).eval()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=teacher.normalize.forward(
            pixels.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), pixel_mask=pmask).logits
        out = teacher(images, ids, mask, capture=True)
        alone = teacher(images[[0]], ids[[0]], mask[[0]]).logits
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone, want[[0]], rtol=1e-5, atol=1e-6)  # batch composition does not matter
    assert not torch.allclose(want[0], want[1], rtol=1e-2)  # the logits depend on the image
    t2i, _ = t2i_i2t(out.qk[0])
    n_valid = images.valid.sum(1)
    assert n_valid.tolist() == [12, 10, 25]
    assert t2i.exp()[0, :, :, 1 + 12:].max() < 1e-6  # image 0's padded patches: no mass


def test_joint_states_for_layer_distillation_match_transformers(vqa_dir):
    """layers=(...): each block's attention (from the hooked q/k) equals transformers' eager
    attention over valid keys, and the block outputs are its hidden_states."""
    from dide_scale.models.attention import cross_log_probs
    teacher = HFViltTeacher.from_pretrained(vqa_dir, "vqa")
    images, ids, mask = inputs()
    with torch.no_grad():
        out = teacher(images, ids, mask, layers=(1, 0))
        ref = ViltForQuestionAnswering.from_pretrained(vqa_dir, attn_implementation="eager").eval()
        image_embeds = teacher.embed_image(images)
        want = ref(input_ids=ids, attention_mask=mask, image_embeds=image_embeds,
                   pixel_mask=torch.ones(B, 1, image_embeds.shape[1], dtype=torch.long),
                   output_attentions=True, output_hidden_states=True)
    (st,) = out.states
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=1e-6)
    assert torch.equal(st.mask[:, :NT], mask.bool()) and st.mask[:, NT:].all()
    for i, layer in enumerate((1, 0)):
        probs = cross_log_probs(st.q[i], st.k[i], st.mask).exp()
        rows = st.mask[:, None, :, None].expand_as(probs)
        torch.testing.assert_close(probs[rows], want.attentions[layer][rows], rtol=0, atol=1e-5)
        torch.testing.assert_close(st.hidden[i], want.hidden_states[layer + 1], rtol=0, atol=0)


def test_image_embeddings_are_visual_embed_without_its_shuffle(vqa_dir):
    """The valid tokens of transformers' visual_embed on a padded canvas (per-image position
    interpolation), minus its random patch order."""
    teacher = HFViltTeacher.from_pretrained(vqa_dir, "vqa")
    pixels, pmask, images = canvas()
    emb = teacher.vilt.embeddings
    with torch.no_grad():
        ours = teacher.embed_image(images)
        torch.manual_seed(3)
        normed = teacher.normalize(pixels.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        theirs, theirs_mask, (patch_index, _) = emb.visual_embed(normed, pmask, max_image_length=-1)
    torch.testing.assert_close(ours[:, 0], theirs[:, 0], rtol=0, atol=0)
    for i in range(B):
        gh, gw = (int(v) for v in images.grid()[i])
        keep = theirs_mask[i, 1:].bool()
        rc = patch_index[i][keep]  # (row, col) of transformers' valid tokens, shuffled
        assert len(rc) == gh * gw
        raster = rc[:, 0] * gw + rc[:, 1]
        torch.testing.assert_close(ours[i, 1:][raster], theirs[i, 1:][keep], rtol=0, atol=1e-5)


def test_nlvr2_two_passes(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(num_images=2, num_labels=2, modality_type_vocab_size=3)
    ref = ViltForImagesAndTextClassification(cfg).eval()
    save(ref, tmp_path)
    teacher = HFViltTeacher.from_pretrained(tmp_path, "nlvr2")
    assert teacher.num_classes == 2
    images, ids, mask = inputs()
    images2, _, _ = inputs(seed=5)
    with torch.no_grad():
        out = teacher(images, ids, mask, images2, capture=True)
        logits, qks = out.logits, out.qk
        embeds = torch.stack([teacher.embed_image(images), teacher.embed_image(images2)], 1)
        pm = torch.ones(B, 2, 1, embeds.shape[2], dtype=torch.long)
        want = ref(input_ids=ids, attention_mask=mask, image_embeds=embeds, pixel_mask=pm).logits
    assert logits.shape == (B, 2) and len(qks) == 2
    torch.testing.assert_close(logits, want, rtol=0, atol=1e-6)
    # same text, different image (and image token type): text queries differ at the last block
    assert torch.equal(qks[0].text_mask, qks[1].text_mask)
    assert not torch.allclose(qks[0].q_text, qks[1].q_text)
    with pytest.raises(ValueError, match="two images"):
        teacher(images, ids, mask)


def test_itm_logits_and_plain_model_refused(tmp_path):
    torch.manual_seed(0)
    ref = ViltForImageAndTextRetrieval(tiny_config()).eval()
    save(ref, tmp_path / "itm")
    teacher = HFViltTeacher.from_pretrained(tmp_path / "itm", "itm")
    images, ids, mask = inputs()
    with torch.no_grad():
        logits = teacher(images, ids, mask).logits
        score = ref(input_ids=ids, attention_mask=mask, image_embeds=teacher.embed_image(images),
                    pixel_mask=torch.ones(B, 1, 17, dtype=torch.long)).logits
    # a ranking score per pair, distilled over each anchor's candidates (losses.itm_listwise_kl)
    assert logits.shape == (B, 1) and teacher.itm_form == "rank"
    torch.testing.assert_close(logits, score, rtol=0, atol=1e-6)

    save(ViltModel(tiny_config()), tmp_path / "plain")
    with pytest.raises(ValueError, match="ViltForImageAndTextRetrieval"):
        HFViltTeacher.from_pretrained(tmp_path / "plain", "itm")
    # the same refusal without an `architectures` hint: missing head weights are detected
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    cfg.pop("architectures", None)
    (tmp_path / "plain" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rank_output"):
        HFViltTeacher.from_pretrained(tmp_path / "plain", "itm")


def test_snli_ve_needs_three_labels(vqa_dir, tmp_path):
    with pytest.raises(ValueError, match="3 labels"):
        HFViltTeacher.from_pretrained(vqa_dir, "snli_ve")
    torch.manual_seed(0)
    save(ViltForQuestionAnswering(tiny_config(num_labels=3)), tmp_path)
    teacher = HFViltTeacher.from_pretrained(tmp_path, "snli_ve")
    logits = teacher(*inputs()).logits
    assert logits.shape == (B, 3) and teacher.num_classes == 3


def test_preprocessor_normalisation(vqa_dir, tmp_path):
    assert torch.allclose(HFViltTeacher.from_pretrained(vqa_dir, "vqa").normalize.mean, torch.tensor(0.5))
    torch.manual_seed(0)
    save(ViltForQuestionAnswering(tiny_config()), tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    t = HFViltTeacher.from_pretrained(tmp_path, "vqa")
    assert torch.allclose(t.normalize.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(t.normalize.std.flatten(), torch.tensor([0.4, 0.5, 0.6]))


def test_bad_inputs(tmp_path, vqa_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        HFViltTeacher.from_pretrained(missing, "vqa")
    assert str(missing) in str(e.value) and "ViLT checkpoint directory" in str(e.value)
    assert "config.json" in str(e.value)

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ValueError) as e:
        HFViltTeacher.from_pretrained(bert, "vqa")
    assert "'bert'" in str(e.value) and "ViLT checkpoint" in str(e.value)

    with pytest.raises(ValueError, match="task="):
        HFViltTeacher.from_pretrained(vqa_dir, "captioning")
    with pytest.raises(ValueError, match="loss.teacher_layer"):
        HFViltTeacher.from_pretrained(vqa_dir, "vqa", tap_layer=5)
    with pytest.raises(ValueError, match="ViltForImagesAndTextClassification"):
        HFViltTeacher.from_pretrained(vqa_dir, "nlvr2")
    teacher = HFViltTeacher.from_pretrained(vqa_dir, "vqa")
    images, ids, mask = inputs()
    with pytest.raises(ValueError, match="text positions"):
        teacher(images, torch.ones(B, 13, dtype=torch.long), torch.ones(B, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="resample them first"):
        teacher(inputs(patch=8)[0], ids, mask)


def test_small_fusion_student_distils_from_vilt_at_its_own_patch_size(vqa_dir):
    """DistillVLM from a transformers ViLT teacher (patch 16) into a fusion student with patch 8
    at half the resolution: the same 4x4 grid, so the teacher gets each patch resampled to 16 px
    and every token lines up; attention MSE, token NCE and soft labels are finite and reach the
    student."""
    from dide_scale.config import LossConfig
    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.student import TowerShape
    from dide_scale.objective import DistillObjective
    teacher = HFViltTeacher.from_pretrained(vqa_dir, "vqa")
    torch.manual_seed(0)
    student = FusionEncoder(TowerShape(width=16, depth=1, heads=2, patch_size=8, image_size=[32, 32], max_text_len=12,
                                       vocab_size=100), "vqa", 5)
    student.add_distill_projections(1, teacher.width)
    obj = DistillObjective(student, teacher, LossConfig(attn_t2i=0, attn_i2t=0, soft_label=1.0, attn_mse=1.0,
                                                    token_nce=1.0, nce_queue_size=32), "vqa")
    obj.train()
    assert obj.teacher_patch == 16 and obj.t_layers == (1,) and obj.s_layers == (0,)
    images, ids, mask = inputs(32, 32, patch=8)
    b = {"images": images, "input_ids": ids, "attention_mask": mask, "labels": torch.rand(B, 5)}
    for _ in range(2):  # the second step has negatives in the queue
        out = obj.training_forward(b)
    assert all(torch.isfinite(v) for v in out.parts.values()) and out.parts["token_nce"] > 0
    out.loss.backward()
    assert student.distill_proj[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
