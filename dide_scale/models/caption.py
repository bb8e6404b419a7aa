"""Captioning with a fusion model, as Oscar/VinVL caption (``BertForImageCaptioning``), over
image patches instead of detector regions.

One sequence ``[caption tokens ; image tokens]`` under a **seq2seq attention mask**: a
caption token sees the image and the caption tokens up to itself; an image token sees only
the image.  Training predicts masked caption tokens (``data.transforms.CaptionMasking``).
Decoding appends ``[MASK]`` after the prefix and reads the next token off its output, as
Oscar does; because no earlier position ever sees a later one, each step only has to
compute the newest real token and the ``[MASK]`` (:class:`CachedStepper`): the image
tokens' keys/values are computed once per image and the prefix's are kept, per block.
:class:`FullStepper` recomputes the whole sequence every step (the reference the cache
is tested against).  :func:`generate` runs greedy or beam search over either.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .images import Images


def seq2seq_mask(text_mask: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """[B, Nt] text and [B, Ni] image validity -> [B, Nt + Ni, Nt + Ni] bool, True where query
    (row) may attend key (column): a valid caption token sees the valid caption tokens up to
    itself and the valid image tokens; every other token (image tokens, padded caption
    slots) sees the valid image tokens only, so no row is empty."""
    text_mask, image_mask = text_mask.bool(), image_mask.bool()
    b, nt = text_mask.shape
    causal = torch.ones(nt, nt, dtype=torch.bool, device=text_mask.device).tril()
    t2t = causal[None] & text_mask[:, None, :] & text_mask[:, :, None]
    t2i = image_mask[:, None, :].expand(b, nt, -1)
    i2t = text_mask.new_zeros(b, image_mask.shape[1], nt)
    i2i = image_mask[:, None, :].expand(b, image_mask.shape[1], -1)
    return torch.cat([torch.cat([t2t, t2i], 2), torch.cat([i2t, i2i], 2)], 1)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, Nq, Nk] bool -> [B, 1, Nq, Nk] additive mask (0 keep, dtype's min drop) for SDPA."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


class CaptionHead(nn.Module):
    """ViLT's / BERT's MLM head: Linear -> GELU -> LayerNorm, then a decoder to the vocabulary
    (its own weights, as ViLT's ``MLMHead``, so ZeRO-3 never needs the word embeddings outside
    their module)."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12))
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(x))


@dataclass(frozen=True)
class Generation:
    """Decoding settings.  ``max_length`` counts generated tokens, [SEP] included; a
    hypothesis' score is its summed log-probability / (generated tokens ** ``length_penalty``)."""

    beam_size: int = 5
    max_length: int = 20
    length_penalty: float = 1.0


@dataclass(frozen=True)
class SpecialTokens:
    """The tokenizer's ids: [CLS] starts a caption, [SEP] ends it, [MASK] asks for the next token."""

    bos: int
    eos: int
    pad: int
    mask: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialTokens":
        ids = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id)
        if any(i is None for i in ids):
            raise ValueError("captioning needs a tokenizer with [CLS], [SEP], [PAD] and [MASK] tokens (a BERT "
                             "word-piece tokenizer)")
        return cls(*ids)


def block_step(blk, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None,
               add: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A timm ``Block`` (eval: no dropout / drop-path) over new tokens ``x`` [B, n, C] whose
    queries attend the cached keys/values ``past`` ([B, H, P, D] each, or None) followed by
    their own; ``add`` [B, 1, n, P + n] additive.  Returns (output, the new tokens' k, v).
    The same operations as ``Block.forward`` (submodules called as modules, so ZeRO-3 gathers
    their parameters)."""
    a = blk.attn
    b, n, _ = x.shape
    h = blk.norm1(x)
    q, k, v = a.qkv(h).reshape(b, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    if a.fused_attn:
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=add)
    else:  # timm's own manual path when fused attention is switched off
        s = (q * a.scale) @ keys.transpose(-2, -1)
        o = (s if add is None else s + add).softmax(-1) @ values
    o = a.norm(o.transpose(1, 2).reshape(b, n, a.attn_dim))
    if getattr(a, "gate", None) is not None:
        o = o * a.gate(h).sigmoid()
    x = x + blk.ls1(a.proj(o))
    return x + blk.ls2(blk.mlp(blk.norm2(x))), k, v


class CachedStepper:
    """Next-token log-probabilities of a captioning ``FusionEncoder`` for rows of prefixes,
    with every block's keys/values of the image and of the committed prefix cached.

    ``step(seq)`` takes the rows' tokens so far ([R, t], [CLS] first) and returns [R, vocab]
    for position t: it feeds the last token (position t-1, which the previous step saw
    as [MASK]) and a [MASK] at t, then keeps the last token's keys/values.  ``reorder(idx)``
    follows beam search's choice of rows."""

    def __init__(self, model, images: Images, rows_per_image: int, tokens: SpecialTokens):
        self.model, self.tokens = model, tokens
        x = model.embed_image(images, 1)
        valid = images.token_mask()
        add = additive(valid[:, None, :].expand(-1, x.shape[1], -1), x.dtype)
        self.kv_image = []
        for blk in model.vit.blocks:  # image tokens never see text: once per image for all steps and beams
            x, k, v = block_step(blk, x, None, add)
            self.kv_image.append((k.repeat_interleave(rows_per_image, 0), v.repeat_interleave(rows_per_image, 0)))
        self.image_valid = valid.repeat_interleave(rows_per_image, 0)
        self.kv_text: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def step(self, seq: torch.Tensor) -> torch.Tensor:
        m, t = self.model, seq.shape[1]
        r = seq.shape[0]
        ids = torch.stack([seq[:, -1], torch.full_like(seq[:, -1], self.tokens.mask)], 1)
        pos = torch.tensor([t - 1, t], device=seq.device).expand(r, 2)
        x = m.text_embeddings(input_ids=ids, position_ids=pos) + m.type_embedding(0, ids)
        prefix = 0 if self.kv_text is None else self.kv_text[0][0].shape[2]
        # keys: [image ; committed prefix ; last token ; mask]; the last token does not see the mask
        allowed = torch.cat([self.image_valid[:, None, :].expand(-1, 2, -1),
                             self.image_valid.new_ones(r, 2, prefix),
                             torch.tensor([[True, False], [True, True]], device=seq.device).expand(r, 2, 2)], 2)
        add = additive(allowed, x.dtype)
        kv = []
        for i, blk in enumerate(m.vit.blocks):
            past = self.kv_image[i]
            if self.kv_text is not None:
                past = (torch.cat([past[0], self.kv_text[i][0]], 2), torch.cat([past[1], self.kv_text[i][1]], 2))
            x, k, v = block_step(blk, x, past, add)
            kv.append((k[:, :, :1], v[:, :, :1]))
        self.kv_text = kv if self.kv_text is None else [
            (torch.cat([ok, nk], 2), torch.cat([ov, nv], 2)) for (ok, ov), (nk, nv) in zip(self.kv_text, kv)]
        return F.log_softmax(m.head(m.vit.norm(x[:, 1])).float(), -1)

    def reorder(self, idx: torch.Tensor) -> None:
        # beam rows only move within their image, whose cached image keys/values they share
        if self.kv_text is not None:
            self.kv_text = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.kv_text]


class FullStepper:
    """The same log-probabilities as :class:`CachedStepper`, by running the model over the
    whole sequence (prefix, [MASK], padding; image) every step, as in training."""

    def __init__(self, model, images: Images, rows_per_image: int, tokens: SpecialTokens):
        self.model, self.tokens = model, tokens
        self.images = images[torch.arange(len(images), device=images.patches.device).repeat_interleave(rows_per_image)]

    def step(self, seq: torch.Tensor) -> torch.Tensor:
        r, t = seq.shape
        nt = self.model.shape.max_text_len
        ids = torch.full((r, nt), self.tokens.pad, dtype=seq.dtype, device=seq.device)
        ids[:, :t], ids[:, t] = seq, self.tokens.mask
        text_mask = torch.arange(nt, device=seq.device)[None].expand(r, -1) <= t
        positions = torch.zeros_like(text_mask)
        positions[:, t] = True
        return F.log_softmax(self.model(self.images, ids, text_mask.long(), positions=positions).logits.float(), -1)

    def reorder(self, idx: torch.Tensor) -> None:
        pass  # the images of a row's beams are the same image


@torch.no_grad()
def generate(model, images: Images, tokens: SpecialTokens, settings: Generation, cached: bool = True,
             early_stop: bool = True) -> list[tuple[list[int], float]]:
    """Captions for a batch of images: per image (token ids after [CLS], up to and without
    [SEP]; score).  Greedy when ``settings.beam_size`` is 1, else beam search.
    ``early_stop=False`` runs all ``max_length`` steps even when every caption has ended
    (ranks decoding in lock-step under ZeRO-3 must make the same calls)."""
    if settings.max_length >= model.shape.max_text_len:
        raise ValueError(f"a caption of max_length={settings.max_length} tokens after [CLS] does not fit the "
                         f"model's {model.shape.max_text_len} text positions (at most {model.shape.max_text_len - 1})")
    k = settings.beam_size
    stepper = (CachedStepper if cached else FullStepper)(model, images, k, tokens)
    if k == 1:
        return _greedy(stepper, len(images), tokens, settings, early_stop, images.patches.device)
    return _beam(stepper, len(images), tokens, settings, early_stop, images.patches.device)


def _strip(ids: list[int], tokens: SpecialTokens) -> list[int]:
    return ids[: ids.index(tokens.eos)] if tokens.eos in ids else ids


def _greedy(stepper, n: int, tokens: SpecialTokens, s: Generation, early_stop: bool, device):
    seq = torch.full((n, 1), tokens.bos, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    score = torch.zeros(n, device=device)
    length = torch.zeros(n, device=device)
    for _ in range(s.max_length):
        logp = stepper.step(seq)
        nxt = logp.argmax(-1)
        score += torch.where(done, 0.0, logp.gather(1, nxt[:, None])[:, 0])
        length += (~done).float()
        nxt = torch.where(done, tokens.pad, nxt)
        seq = torch.cat([seq, nxt[:, None]], 1)
        done |= nxt == tokens.eos
        if early_stop and bool(done.all()):
            break
    norm = score / length.clamp_min(1) ** s.length_penalty
    return [(_strip(row[1:], tokens), float(v)) for row, v in zip(seq.tolist(), norm.tolist())]


class _Hypotheses:
    """The ``beam_size`` best finished captions of one image (score = logprob / len ** lp)."""

    def __init__(self, k: int, lp: float):
        self.k, self.lp, self.items = k, lp, []

    def add(self, ids: list[int], logprob: float, length: int) -> None:
        self.items.append((logprob / length ** self.lp, ids))
        self.items.sort(key=lambda it: -it[0])
        del self.items[self.k:]

    def closed(self, best_running: float, length: int) -> bool:
        """Full, and no running beam (whose score can only fall) can still beat the worst kept."""
        return len(self.items) == self.k and best_running / length ** self.lp <= self.items[-1][0]


def _beam(stepper, n: int, tokens: SpecialTokens, s: Generation, early_stop: bool, device):
    k = s.beam_size
    seq = torch.full((n * k, 1), tokens.bos, dtype=torch.long, device=device)
    beam_scores = torch.zeros(n, k, device=device)
    beam_scores[:, 1:] = float("-inf")  # all beams start equal: expand the first one only
    hyps = [_Hypotheses(k, s.length_penalty) for _ in range(n)]
    done = [False] * n
    for t in range(1, s.max_length + 1):
        logp = stepper.step(seq).view(n, k, -1)
        vocab = logp.shape[-1]
        top_s, top_i = (beam_scores[..., None] + logp).view(n, -1).topk(2 * k, dim=1)
        rows, toks, scores = [], [], []
        for b, (cand_s, cand_i) in enumerate(zip(top_s.tolist(), top_i.tolist())):
            kept = []
            for rank, (sc, ci) in enumerate(zip(cand_s, cand_i)):
                beam, tok = divmod(ci, vocab)
                if done[b] or len(kept) == k:
                    break
                if tok == tokens.eos:
                    if rank < k:  # an ending among the top k is a finished caption
                        hyps[b].add(seq[b * k + beam, 1:].tolist(), sc, t)
                else:
                    kept.append((b * k + beam, tok, sc))
            if done[b] or not kept:  # finished images carry dummy beams that are never read
                kept = [(b * k, tokens.pad, float("-inf"))] * k
            kept += [kept[-1][:2] + (float("-inf"),)] * (k - len(kept))
            rows += [r for r, _, _ in kept]
            toks += [tk for _, tk, _ in kept]
            scores += [sc for _, _, sc in kept]
            done[b] = done[b] or hyps[b].closed(max(sc for _, _, sc in kept), t)
        idx = torch.tensor(rows, device=device)
        stepper.reorder(idx)
        seq = torch.cat([seq.index_select(0, idx), torch.tensor(toks, device=device)[:, None]], 1)
        beam_scores = torch.tensor(scores, device=device).view(n, k)
        if early_stop and all(done):
            break
    out = []
    for b in range(n):
        if not done[b]:  # ran out of length: the running beams compete as they are
            for j in range(k):
                sc = float(beam_scores[b, j])
                if sc > float("-inf"):
                    hyps[b].add(seq[b * k + j, 1:].tolist(), sc, seq.shape[1] - 1)
        score, ids = hyps[b].items[0]
        out.append((_strip(ids, tokens), score))
    return out
