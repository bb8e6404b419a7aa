"""The DiDE losses (METHOD.md), as pure functions of tensors."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .models.attention import CrossQK, t2i_i2t


def map_heads(t_logp: torch.Tensor, s_logp: torch.Tensor, head_map: str):
    """Make teacher and student head axes comparable.

    'per_head' needs equal head counts; 'mean' averages the *probabilities* over heads
    (one distribution per query) on both sides.
    """
    if head_map == "per_head":
        if t_logp.shape[1] != s_logp.shape[1]:
            raise ValueError(f"teacher has {t_logp.shape[1]} heads and the student {s_logp.shape[1]}: "
                             "per-head distillation needs equal counts; set loss.head_map=mean")
        return t_logp, s_logp
    if head_map == "mean":
        def avg(lp):
            return torch.logsumexp(lp, dim=1, keepdim=True) - torch.log(torch.tensor(float(lp.shape[1])))
        return avg(t_logp), avg(s_logp)
    raise ValueError(f"unknown loss.head_map {head_map!r}")


def attention_kl(t_logp: torch.Tensor, s_logp: torch.Tensor, query_mask: torch.Tensor | None,
                 head_map: str = "per_head") -> torch.Tensor:
    """KL(P_teacher || P_student) summed over keys, averaged over valid queries, heads, batch.

    ``t_logp``/``s_logp`` are log-probabilities [B, H, Nq, Nk] whose masked keys carry
    ~zero probability (see ``cross_log_probs``); ``query_mask`` [B, Nq] excludes padded
    queries from the mean (FIX over the released code, which averaged them in).
    """
    if t_logp.shape[-2:] != s_logp.shape[-2:]:
        raise ValueError(f"teacher attention {tuple(t_logp.shape)} and student {tuple(s_logp.shape)} cover "
                         "different tokens: they must see the same patches and text tokens")
    t_logp, s_logp = map_heads(t_logp, s_logp, head_map)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)  # [B, H, Nq]; finite: masked p_t underflows to 0
    if query_mask is None:
        return kl.mean()
    qm = query_mask[:, None, :].to(kl.dtype)
    return (kl * qm).sum() / (qm.sum() * kl.shape[1]).clamp_min(1.0)


def cross_attention_losses(teacher: list[CrossQK], student: list[CrossQK], head_map: str
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_t2i, L_i2t) averaged over the image passes (two for NLVR2)."""
    t2i, i2t = [], []
    for tq, sq in zip(teacher, student, strict=True):
        with torch.no_grad():
            tt, ti = t2i_i2t(tq)
        st, si = t2i_i2t(sq)
        t2i.append(attention_kl(tt, st, sq.text_mask, head_map))
        i2t.append(attention_kl(ti, si, sq.image_mask, head_map))
    return torch.stack(t2i).mean(), torch.stack(i2t).mean()


def soft_label_bce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """VQA: BCEWithLogits(student, sigmoid(teacher / T)) * n_answers."""
    target = torch.sigmoid(teacher_logits.float() / temperature)
    return F.binary_cross_entropy_with_logits(student_logits.float(), target) * student_logits.shape[-1]


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Classification/ITM: KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean."""
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def vqa_ground_truth(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """VQA ground truth: BCE against the VQA soft scores, * n_answers (ViLT's convention)."""
    return F.binary_cross_entropy_with_logits(logits.float(), soft_targets.float()) * logits.shape[-1]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank; gradients flow back to each rank's own slice."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    import torch.distributed.nn.functional as dnnf
    return torch.cat(dnnf.all_gather(x), dim=0)


def contrastive(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (embeddings gathered across ranks with grad)."""
    all_t, all_i = gather_with_grad(text_emb), gather_with_grad(image_emb)
    offset = 0
    if dist.is_available() and dist.is_initialized():
        offset = dist.get_rank() * text_emb.shape[0]
    labels = torch.arange(text_emb.shape[0], device=text_emb.device) + offset
    scale = logit_scale.exp().clamp(max=100)
    logits_t2i = scale * text_emb @ all_i.t()
    logits_i2t = scale * image_emb @ all_t.t()
    return 0.5 * (F.cross_entropy(logits_t2i.float(), labels) + F.cross_entropy(logits_i2t.float(), labels))


@torch.no_grad()
def mine_hard_negatives(text_emb: torch.Tensor, image_emb: torch.Tensor, generator: torch.Generator | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each pair, sample a hard negative image for its text and a hard negative text for
    its image, with probability softmax(similarity) over the local batch, never itself.

    Returns (neg_image_idx, neg_text_idx), each [B].  Needs B >= 2.
    """
    b = text_emb.shape[0]
    if b < 2:
        raise ValueError("hard-negative mining needs a micro-batch of at least 2 pairs")
    sim = text_emb.float() @ image_emb.float().t()
    eye = torch.eye(b, dtype=torch.bool, device=sim.device)
    w_t2i = torch.softmax(sim.masked_fill(eye, -1e4), dim=1)
    w_i2t = torch.softmax(sim.t().masked_fill(eye, -1e4), dim=1)
    neg_img = torch.multinomial(w_t2i, 1, generator=generator).squeeze(1)
    neg_txt = torch.multinomial(w_i2t, 1, generator=generator).squeeze(1)
    return neg_img, neg_txt
