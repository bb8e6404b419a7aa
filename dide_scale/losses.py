"""The DiDE losses (docs/METHOD.md), as pure functions of tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import gather_newest, gather_with_grad, rank
from .models.attention import CrossQK, JointStates, cross_log_probs, t2i_i2t


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
    """(L_t2i, L_i2t), summed over the image passes (NLVR2 has two, and DiDE adds both
    passes' losses)."""
    t2i, i2t = [], []
    for tq, sq in zip(teacher, student, strict=True):
        with torch.no_grad():
            tt, ti = t2i_i2t(tq)
        st, si = t2i_i2t(sq)
        t2i.append(attention_kl(tt, st, sq.text_mask, head_map))
        i2t.append(attention_kl(ti, si, sq.image_mask, head_map))
    return torch.stack(t2i).sum(), torch.stack(i2t).sum()


def soft_label_bce(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                   present: torch.Tensor | None = None) -> torch.Tensor:
    """VQA: BCEWithLogits(student, sigmoid(teacher / T)) * n_answers, i.e. summed over answers
    and averaged over the batch.  ``present`` [n_answers] bool leaves out the answers the
    teacher does not know (their teacher logits are meaningless)."""
    target = torch.sigmoid(teacher_logits.float() / temperature)
    bce = F.binary_cross_entropy_with_logits(student_logits.float(), target, reduction="none")
    if present is not None:
        bce = bce * present.to(bce.dtype)
    return bce.sum(-1).mean()


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """Classification/ITM: KL(softmax(t/T) || softmax(s/T)) * T^2, batch mean."""
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def itm_candidate_lists(scores: torch.Tensor) -> torch.Tensor:
    """Per-row match scores of the ITM rows [positives; (text, negative image); (negative
    text, image)] ([3B]) -> each anchor's candidate list [2B, 2]: every text's (positive,
    its negative image) and every image's (positive, its negative text)."""
    pos, neg_img, neg_txt = scores.chunk(3)
    return torch.cat([torch.stack([pos, neg_img], -1), torch.stack([pos, neg_txt], -1)])


def itm_listwise_kl(student_logits: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0):
    """ITM distillation from a ranking teacher (transformers' ``ViltForImageAndTextRetrieval``,
    whose ``rank_output`` was trained with a softmax over each query's candidates, so only
    score differences within a candidate list mean anything): KL between the teacher's and
    the student's distributions over each anchor's candidates, * T^2, mean over anchors.
    The student's score of a row is its match log-odds (logit[1] - logit[0])."""
    s = student_logits.float()
    t = itm_candidate_lists(teacher_scores.float().reshape(-1))
    return soft_label_kl(itm_candidate_lists(s[:, 1] - s[:, 0]), t, temperature)


def vqa_ground_truth(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """VQA ground truth: BCE against the VQA soft scores, * n_answers (ViLT's convention)."""
    return F.binary_cross_entropy_with_logits(logits.float(), soft_targets.float()) * logits.shape[-1]


def contrastive(text_emb: torch.Tensor, image_emb: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (embeddings gathered across ranks with grad);
    ``scale`` = 1 / temperature.  Computed in fp32 (the similarities of a bf16 run lose
    too much precision before the softmax otherwise)."""
    t, i = text_emb.float(), image_emb.float()
    all_t, all_i = gather_with_grad(t), gather_with_grad(i)
    labels = torch.arange(t.shape[0], device=t.device) + rank() * t.shape[0]
    scale = scale.float()
    return 0.5 * (F.cross_entropy(scale * t @ all_i.t(), labels) + F.cross_entropy(scale * i @ all_t.t(), labels))


# -- DistillVLM (Fang et al., arXiv 2104.02096): layer-to-layer losses for a fusion student --

def attention_mse(t_q: torch.Tensor, t_k: torch.Tensor, s_q: torch.Tensor, s_k: torch.Tensor,
                  mask: torch.Tensor, head_map: str = "per_head", pair_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """MSE between teacher and student self-attention probabilities of one mapped block pair.

    Probabilities are softmax(q k^T / sqrt(d)) over the valid keys (fp32); with
    ``head_map='mean'`` both sides are first averaged over heads.  Squared differences are
    summed over keys and averaged over valid queries, heads and batch (the normalisation of
    the attention KL, so the two weights are on one scale); padded text positions count
    neither as queries nor as keys.  q/k: [B, H, N, D]; mask: [B, N] bool.  ``pair_mask``
    [B, N, N] bool (a captioner's seq2seq mask): each query's distribution is over the keys
    it may attend only, and only those differences count.
    """
    if t_q.shape[2] != s_q.shape[2]:
        raise ValueError(f"teacher sequence of {t_q.shape[2]} tokens vs student {s_q.shape[2]}: they must see "
                         "the same text tokens and image patches")
    keys = mask if pair_mask is None else pair_mask
    with torch.no_grad():
        pt = cross_log_probs(t_q, t_k, keys).exp()
    ps = cross_log_probs(s_q, s_k, keys).exp()
    if head_map == "mean":
        pt, ps = pt.mean(1, keepdim=True), ps.mean(1, keepdim=True)
    elif pt.shape[1] != ps.shape[1]:
        raise ValueError(f"teacher has {pt.shape[1]} heads and the student {ps.shape[1]}: per-head attention "
                         "MSE needs equal counts; set loss.head_map=mean")
    m = mask.to(ps.dtype)
    km = m[:, None, None, :] if pair_mask is None else pair_mask.to(ps.dtype)[:, None]
    sq = ((pt - ps).pow(2) * km).sum(-1)  # [B, H, N]: over each query's keys
    sq = sq * m[:, None, :]
    return sq.sum() / (m.sum() * ps.shape[1]).clamp_min(1.0)


def layer_attention_mse(teacher: list[JointStates], student: list[JointStates], head_map: str) -> torch.Tensor:
    """attention_mse averaged over mapped block pairs and image passes."""
    vals = [attention_mse(tq, tk, sq, sk, s.mask, head_map, s.attn_mask)
            for t, s in zip(teacher, student, strict=True)
            for tq, tk, sq, sk in zip(t.q, t.k, s.q, s.k, strict=True)]
    return torch.stack(vals).mean()


def valid_rows(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the true entries of a [B, N] mask in the flattened [B * N] order (the rows
    boolean indexing would take), found once: each boolean index is a host sync."""
    return mask.flatten().nonzero().squeeze(1)


def token_nce(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor,
              negatives: torch.Tensor, temperature: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Token-wise noise-contrastive loss of one mapped block pair.

    For every valid token, the student's state (already projected to the teacher's width)
    must pick the teacher's state of the same token out of {that state} + ``negatives``
    (teacher token states from earlier batches, [K, C], L2-normalised).  Cosine similarity
    / ``temperature``, cross-entropy, mean over valid tokens.  With an empty queue (the very
    first step) the loss is 0.  student_h/teacher_h: [B, N, C]; mask: [B, N] bool; ``rows``
    ``valid_rows(mask)`` when the caller has it already.
    """
    rows = valid_rows(mask) if rows is None else rows
    s = F.normalize(student_h.flatten(0, 1).index_select(0, rows).float(), dim=-1)  # [M, C]
    t = F.normalize(teacher_h.flatten(0, 1).index_select(0, rows).float(), dim=-1)
    pos = (s * t).sum(-1, keepdim=True)
    logits = torch.cat([pos, s @ negatives.float().t()], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


class TokenQueue:
    """FIFO ring of L2-normalised teacher token states, one ring per mapped block pair.

    ``push`` gathers the new tokens of every rank (in rank order, so the ring is identical
    on all ranks and equal to a one-process run over the same global batch) and writes
    them after the newest entries; when more arrive than fit, the newest ``size`` stay
    (and only those are sent between ranks).  With more new tokens per step than ``size``,
    the whole ring is replaced every micro-batch by the newest tokens of the last ranks.
    The ring is part of the checkpoint (``state_dict``), so a resumed run sees the same
    negatives.
    """

    def __init__(self, n_pairs: int, size: int):
        if size <= 0:
            raise ValueError(f"loss.nce_queue_size={size} must be > 0")
        self.n_pairs, self.size = n_pairs, size
        self.buf: torch.Tensor | None = None  # [P, K, C] fp32, allocated on first push/load
        self.ptr = 0
        self.filled = 0

    def negatives(self, pair: int, like: torch.Tensor) -> torch.Tensor:
        """The valid entries of ``pair``'s ring ([filled, C]); empty before the first push."""
        if self.buf is None:
            return like.new_zeros(0, like.shape[-1], dtype=torch.float32)
        if self.buf.device != like.device:  # restored from a checkpoint on the CPU
            self.buf = self.buf.to(like.device)
        return self.buf[pair, : self.filled]

    @torch.no_grad()
    def push(self, tokens: list[torch.Tensor]) -> None:
        """``tokens``: per mapped pair, this rank's new teacher token states [M, C]."""
        new = F.normalize(torch.stack([t.float() for t in tokens]), dim=-1)  # [P, M, C]
        new = gather_newest(new, self.size)  # only the newest `size` tokens of the global batch can stay
        if self.buf is None:
            self.buf = new.new_zeros(self.n_pairs, self.size, new.shape[-1])
        elif self.buf.device != new.device:
            self.buf = self.buf.to(new.device)
        m = new.shape[1]
        idx = (self.ptr + torch.arange(m, device=new.device)) % self.size
        self.buf = self.buf.index_copy(1, idx, new)  # out of place: this step's loss still holds the old ring
        self.ptr = (self.ptr + m) % self.size
        self.filled = min(self.size, self.filled + m)

    def state_dict(self) -> dict:
        return {"buf": None if self.buf is None else self.buf.cpu(), "ptr": self.ptr, "filled": self.filled,
                "size": self.size, "n_pairs": self.n_pairs}

    def load_state_dict(self, st: dict) -> None:
        if (st["size"], st["n_pairs"]) != (self.size, self.n_pairs):
            raise ValueError(f"the checkpoint's token queue holds {st['n_pairs']} x {st['size']} entries, the config "
                             f"{self.n_pairs} x {self.size} (loss.nce_queue_size / loss.layer_map changed?)")
        self.buf, self.ptr, self.filled = st["buf"], st["ptr"], st["filled"]
