"""Cross-modal attention: capture queries/keys at one block, build t2i / i2t distributions.

The student has no cross-attention, so its "cross-modal attention" is built from the text
tower's queries against the image tower's keys (and vice versa) at a chosen block.  The
teacher's is the text/image block of its joint self-attention, renormalised over the other
modality.  Both are expressed as a :class:`CrossQK` so one function turns either into
log-probabilities, and only the distilled block pays for the explicit QK^T (every other
block keeps fused SDPA attention).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CrossQK:
    """Per-head queries and keys of both modalities at the distilled block.

    Shapes: ``q_text``/``k_text`` [B, H, Nt, D], ``q_image``/``k_image`` [B, H, Ni, D];
    ``text_mask`` [B, Nt] bool (True = real token), ``image_mask`` [B, Ni] bool ([CLS] and
    the valid patches; None = all image tokens valid).
    """

    q_text: torch.Tensor
    k_text: torch.Tensor
    q_image: torch.Tensor
    k_image: torch.Tensor
    text_mask: torch.Tensor
    image_mask: torch.Tensor | None = None


@dataclass
class JointStates:
    """What layer-to-layer distillation of a fusion model needs, for the mapped blocks of one
    (text, image) pass over the joint sequence ``[text ; image]``.

    ``q``/``k``: per mapped block, [B, H, N, D]; ``hidden``: per mapped block, the block's
    output [B, N, C] (a student maps it to the teacher's width with its ``distill_proj``);
    ``mask``: [B, N] bool, True = real token (padded text positions are False);
    ``attn_mask``: [B, N, N] bool, the keys each query may attend when that is not every
    real token (a captioner's seq2seq mask), else None.
    """

    q: list[torch.Tensor]
    k: list[torch.Tensor]
    hidden: list[torch.Tensor]
    mask: torch.Tensor
    attn_mask: torch.Tensor | None = None


def resolve_layer_map(layer_map: list[list[int]], teacher_depth: int, student_depth: int
                      ) -> tuple[list[int], list[int]]:
    """``loss.layer_map`` -> (teacher blocks, student blocks), 0-based, in map order.

    Empty map: one pair per student block, student block j <- teacher block
    ``(j + 1) * teacher_depth // student_depth - 1`` (the last blocks line up, every
    ``teacher_depth / student_depth``-th teacher block is used, as TinyBERT / DistillVLM do).
    """
    if not layer_map:
        if student_depth > teacher_depth:
            raise ValueError(f"the student has {student_depth} blocks and the teacher {teacher_depth}: "
                             "give loss.layer_map explicitly")
        pairs = [[(j + 1) * teacher_depth // student_depth - 1, j] for j in range(student_depth)]
    else:
        pairs = layer_map
    t_layers, s_layers = [], []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"loss.layer_map[{i}]={pair}: expected [teacher_block, student_block]")
        t_layers.append(resolve_layer(pair[0], teacher_depth, f"loss.layer_map[{i}][0] (teacher block)"))
        s_layers.append(resolve_layer(pair[1], student_depth, f"loss.layer_map[{i}][1] (student block)"))
    return t_layers, s_layers


def cross_log_probs(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """log softmax(q k^T / sqrt(d)) over the *valid* keys, computed in fp32.  ``key_mask``:
    [B, Nk] (the same keys for every query) or [B, Nq, Nk] (per query).

    Masked keys get a large finite negative logit (not -inf), so a fully padded row stays
    finite and ``0 * log p`` terms never become NaN.
    """
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        km = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
        logits = logits.masked_fill(~km, -1e4)
    return torch.log_softmax(logits, dim=-1)


def t2i_i2t(qk: CrossQK) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P_t2i [B,H,Nt,Ni], log P_i2t [B,H,Ni,Nt])."""
    return (cross_log_probs(qk.q_text, qk.k_image, qk.image_mask),
            cross_log_probs(qk.q_image, qk.k_text, qk.text_mask))


class QKTap:
    """Forward hook on a ``qkv`` Linear (timm ``Attention.qkv``) that keeps its last output.

    Registered once at model build; capturing is switched on per forward so a model that
    is not being distilled pays nothing.  The split into heads happens on request.
    """

    def __init__(self, qkv: nn.Linear, num_heads: int):
        self.num_heads = num_heads
        self.enabled = False
        self.out: torch.Tensor | None = None
        qkv.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.enabled:
            self.out = output

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k), each [B, H, N, D]; clears the stored activation."""
        out, self.out = self.out, None
        if out is None:
            raise RuntimeError("QKTap.take() before a forward with capture enabled")
        b, n, three_c = out.shape
        qkv = out.view(b, n, 3, self.num_heads, three_c // (3 * self.num_heads)).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1]


def run_tapped(taps: list, wanted: set[int], fn):
    """``fn()`` with the taps of the ``wanted`` blocks switched on (``QKTap`` or any object
    with ``enabled`` and ``take()``); returns (its result, {block: (q, k)}).  The taps are
    switched off again whatever happens."""
    for i in wanted:
        taps[i].enabled = True
    try:
        result = fn()
        return result, {i: taps[i].take() for i in wanted}
    finally:
        for i in wanted:
            taps[i].enabled = False


def joint_outputs(qks: dict, capture_layer: int | None, text_mask: torch.Tensor, layers: tuple[int, ...],
                  hidden: list[torch.Tensor], mask: torch.Tensor, image_mask: torch.Tensor,
                  attn_mask: torch.Tensor | None = None) -> tuple[CrossQK | None, JointStates | None]:
    """What a fusion model's pass over ``[text ; image]`` hands the losses: the CrossQK cut at
    ``capture_layer`` (None: not capturing) and the JointStates of ``layers`` (block outputs
    ``hidden`` in the same order).  ``mask`` covers the joint sequence, ``image_mask`` its
    image part ([CLS] + patches); ``attn_mask`` the per-query keys when the model used more
    than ``mask`` (see JointStates)."""
    qk = states = None
    if capture_layer is not None:
        q, k = qks[capture_layer]
        nt = text_mask.shape[1]
        qk = CrossQK(q[:, :, :nt], k[:, :, :nt], q[:, :, nt:], k[:, :, nt:], text_mask.bool(), image_mask.bool())
    if layers:
        states = JointStates([qks[i][0] for i in layers], [qks[i][1] for i in layers], hidden, mask, attn_mask)
    return qk, states


def resolve_layer(index: int, depth: int, name: str) -> int:
    """A possibly negative block index -> 0..depth-1, with an error naming the setting."""
    i = index + depth if index < 0 else index
    if not 0 <= i < depth:
        raise ValueError(f"{name}={index} is out of range for a model with {depth} blocks")
    return i


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, N] bool/0-1 key mask -> [B, 1, 1, N] additive mask for SDPA (0 keep, min drop)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask.bool(), torch.finfo(dtype).min)[:, None, None, :]
