"""The attention distributions, the KL and the soft-label losses against naive references."""
import math

import pytest
import torch
import torch.nn.functional as F

from dide_scale import losses, negatives
from dide_scale.models.attention import CrossQK, t2i_i2t


def naive_probs(q, k, key_mask):
    """Per (b, h, i): softmax over valid keys only, written with python loops."""
    B, H, Nq, D = q.shape
    out = torch.zeros(B, H, Nq, k.shape[2], dtype=torch.float64)
    for b in range(B):
        valid = [j for j in range(k.shape[2]) if key_mask is None or key_mask[b, j]]
        for h in range(H):
            for i in range(Nq):
                logits = torch.tensor([float(q[b, h, i] @ k[b, h, j]) / math.sqrt(D) for j in valid],
                                      dtype=torch.float64)
                p = torch.softmax(logits, 0)
                for jj, j in enumerate(valid):
                    out[b, h, i, j] = p[jj]
    return out


def naive_kl(pt, ps, query_mask):
    """sum_k pt log(pt/ps) over valid keys, mean over valid queries, heads and batch."""
    total, count = 0.0, 0
    B, H, Nq, Nk = pt.shape
    for b in range(B):
        for h in range(H):
            for i in range(Nq):
                if query_mask is not None and not query_mask[b, i]:
                    continue
                total += sum(float(pt[b, h, i, j] * (math.log(pt[b, h, i, j]) - math.log(ps[b, h, i, j])))
                             for j in range(Nk) if pt[b, h, i, j] > 0)
                count += 1
    return total / count


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    B, H, Nt, Ni, D = 3, 2, 6, 5, 8

    def qk():
        return CrossQK(torch.randn(B, H, Nt, D, generator=g), torch.randn(B, H, Nt, D, generator=g),
                       torch.randn(B, H, Ni, D, generator=g), torch.randn(B, H, Ni, D, generator=g),
                       torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]).bool())
    t, s = qk(), qk()
    s.text_mask = t.text_mask
    return t, s


def test_distributions_match_naive_reference_with_padding(pair):
    t, _ = pair
    lp_t2i, lp_i2t = t2i_i2t(t)
    ref_t2i = naive_probs(t.q_text, t.k_image, None)
    ref_i2t = naive_probs(t.q_image, t.k_text, t.text_mask)
    assert torch.allclose(lp_t2i.exp().double(), ref_t2i, atol=1e-5)
    assert torch.allclose(lp_i2t.exp().double(), ref_i2t, atol=1e-5)
    # padded text keys carry no probability mass
    assert lp_i2t.exp()[2, :, :, 2:].max() < 1e-6


def test_kl_matches_naive_reference_over_valid_queries(pair):
    t, s = pair
    l_t2i, l_i2t = losses.cross_attention_losses([t], [s], "per_head")
    t_t2i, t_i2t = t2i_i2t(t)
    s_t2i, s_i2t = t2i_i2t(s)
    ref_t2i = naive_kl(t_t2i.exp().double(), s_t2i.exp().double(), t.text_mask)
    ref_i2t = naive_kl(t_i2t.exp().double(), s_i2t.exp().double(), None)
    assert abs(l_t2i.item() - ref_t2i) < 1e-5
    assert abs(l_i2t.item() - ref_i2t) < 1e-5
    # averaging over padded queries too (the released code's bug) would give another value
    wrong = losses.attention_kl(t_t2i, s_t2i, None)
    assert abs(wrong.item() - ref_t2i) > 1e-4


def test_loss_is_finite_with_padding_and_has_gradients(pair):
    t, s = pair
    s.q_text.requires_grad_(True)
    s.k_text.requires_grad_(True)
    t.text_mask[2] = torch.tensor([1, 0, 0, 0, 0, 0]).bool()
    s.text_mask = t.text_mask
    l_t2i, l_i2t = losses.cross_attention_losses([t], [s], "per_head")
    (l_t2i + l_i2t).backward()
    assert torch.isfinite(l_t2i) and torch.isfinite(l_i2t)
    assert torch.isfinite(s.q_text.grad).all() and torch.isfinite(s.k_text.grad).all()
    # the -inf masking of the released code does produce NaN with kl_div (why we do not use it)
    logits = torch.randn(1, 4).masked_fill(torch.tensor([[False, False, True, True]]), float("-inf"))
    bad = F.kl_div(torch.log_softmax(logits, -1), torch.softmax(logits, -1), reduction="sum")
    assert torch.isnan(bad)


def test_kl_is_zero_for_identical_and_positive_otherwise(pair):
    t, s = pair
    same = losses.cross_attention_losses([t], [t], "per_head")
    assert all(abs(x.item()) < 1e-6 for x in same)
    assert all(x.item() > 0 for x in losses.cross_attention_losses([t], [s], "per_head"))


def test_head_mapping(pair):
    t, s = pair
    s1 = CrossQK(*(x[:, :1] for x in (s.q_text, s.k_text, s.q_image, s.k_image)), s.text_mask)
    with pytest.raises(ValueError, match="head_map=mean"):
        losses.cross_attention_losses([t], [s1], "per_head")
    l_t2i, _ = losses.cross_attention_losses([t], [s1], "mean")
    tp = t2i_i2t(t)[0].exp().mean(1, keepdim=True).double()
    sp = t2i_i2t(s1)[0].exp().double()
    assert abs(l_t2i.item() - naive_kl(tp, sp, t.text_mask)) < 1e-5


def test_token_mismatch_is_refused(pair):
    t, s = pair
    s2 = CrossQK(s.q_text, s.k_text, s.q_image[:, :, :3], s.k_image[:, :, :3], s.text_mask)
    with pytest.raises(ValueError, match="same patches"):
        losses.cross_attention_losses([t], [s2], "per_head")


def test_soft_labels_match_formulas():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    T = 2.0
    bce = losses.soft_label_bce(s, t, T)
    p = torch.sigmoid(t / T)
    ref = -(p * F.logsigmoid(s) + (1 - p) * F.logsigmoid(-s)).mean() * 7
    assert torch.allclose(bce, ref, atol=1e-6)
    kl = losses.soft_label_kl(s, t, T)
    pt, ps = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    ref = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
    assert torch.allclose(kl, ref, atol=1e-6)


def test_contrastive_and_mining():
    g = torch.Generator().manual_seed(2)
    te = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    ie = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    got = losses.contrastive(te, ie, torch.tensor([10.0]))
    logits = 10.0 * te @ ie.t()
    ref = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6)))
    assert torch.allclose(got, ref, atol=1e-6)
    for _ in range(20):
        neg_img, neg_txt, _ = negatives.mine_hard_negatives(te, ie)
        assert (neg_img != torch.arange(6)).all() and (neg_txt != torch.arange(6)).all()
    # the hardest negative is chosen most often
    sim = te @ ie.t()
    sim.fill_diagonal_(-1e4)
    counts = torch.zeros(6, 6)
    torch.manual_seed(0)
    for _ in range(300):
        neg_img, _, _ = negatives.mine_hard_negatives(te, ie)
        counts[torch.arange(6), neg_img] += 1
    assert (counts.argmax(1) == sim.argmax(1)).float().mean() >= 0.5


def test_mining_is_hard_only_at_the_contrastive_temperature():
    """Among 1,024 candidates, a negative at cosine 0.9 (the rest near 0) is drawn < 1% of the
    time from raw cosines, but most of the time from cosine / 0.07, ALBEF's choice."""
    g = torch.Generator().manual_seed(0)
    n, d = 1024, 64
    ie = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    te = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    te[0] = F.normalize(0.9 * ie[1] + (1 - 0.81) ** 0.5 * F.normalize(torch.randn(d, generator=g), dim=0), dim=0)
    hits = {}
    for scale in (1.0, 1 / 0.07):
        gen = torch.Generator().manual_seed(1)
        draws = [negatives.mine_hard_negatives(te, ie, scale, across_ranks=False, generator=gen)[0][0].item()
                 for _ in range(40)]
        hits[scale] = sum(d == 1 for d in draws) / len(draws)
    assert hits[1.0] < 0.1 and hits[1 / 0.07] > 0.8


def test_student_reads_the_contrastive_temperature():
    from dide_scale.build import build_student
    from dide_scale.config import load_config
    cfg = load_config("debug", ["train.task=itm", "loss.itc=1", "loss.itc_temperature=0.05"])
    assert torch.allclose(build_student(cfg).logit_scale.exp(), torch.tensor([20.0]))
