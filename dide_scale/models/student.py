"""The dual-encoder student: an image tower and a text tower that never see each other,
a shallow fusion MLP on their pooled [CLS] states, and the task heads (docs/METHOD.md).

Plain ``nn.Module``s: no parallelism API is imported here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import CrossQK, QKTap, additive_mask, resolve_layer
from .blocks import TowerShape, bert_embeddings, mlp_head, naflex_vit, pooler
from .hub import Exportable
from .images import Images, Normalize
from .output import ModelOutput


def cls_only_block(blk: Block, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """A timm ``Block`` evaluated for the first ([CLS]) token only: its query attends over every
    key, the other tokens' outputs are never computed.  Equals ``blk(x)[:, :1]`` (inference:
    no dropout / drop-path).  The last block of a tower whose only consumer is the [CLS]
    state (the cached embeddings of ``DualEncoderInference``) needs nothing more.

    Every weight is used through its module's call, never read as a tensor: a parameter
    partitioned across ranks (ZeRO-3) is whole only inside its module's forward.  So the
    query projection runs over every token (one extra matrix product in one block)."""
    a = blk.attn
    b, n, c = x.shape
    h = blk.norm1(x)
    dim = a.num_heads * a.head_dim
    qkv = a.qkv(h)
    q = qkv[:, :1, :dim].reshape(b, 1, a.num_heads, a.head_dim).transpose(1, 2)
    k, v = qkv[:, :, dim:].reshape(b, n, 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = a.q_norm(q), a.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    o = a.norm(o.transpose(1, 2).reshape(b, 1, dim))
    if getattr(a, "gate", None) is not None:
        o = o * a.gate(h[:, :1]).sigmoid()
    x = x[:, :1] + blk.ls1(a.proj(o))
    return x + blk.ls2(blk.mlp(blk.norm2(x)))


class ImageTower(nn.Module):
    """timm NaFlexViT over each image's valid patches; returns all token states ([CLS] first)."""

    def __init__(self, shape: TowerShape, tap_layer: int = -1):
        super().__init__()
        self.normalize = Normalize()
        self.vit = naflex_vit(shape, shape.drop_path)
        layer = resolve_layer(tap_layer, shape.depth, "loss.student_layer")
        self.tap = QKTap(self.vit.blocks[layer].attn.qkv, shape.heads)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, images: Images, cls_only: bool = False) -> torch.Tensor:
        """All token states [B, 1+N, C] (padded patches attend to nothing and are attended by
        nothing that matters); with ``cls_only`` just the [CLS] state [B, 1, C] (the last block
        computes nothing else)."""
        v = self.vit
        x, _ = v.embeds(self.normalize(images.patches), patch_coord=images.coord, patch_valid=images.valid)
        x = v.norm_pre(x)
        mask = additive_mask(images.token_mask(), x.dtype)
        for blk in v.blocks[:-1] if cls_only else v.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask=mask)
        if cls_only:
            x = cls_only_block(v.blocks[-1], x, mask)
        return v.norm(x)


class TextTower(nn.Module):
    """BERT embeddings followed by pre-LN ViT blocks (the same block type as ViLT, so both
    towers can be initialised from one ViLT checkpoint)."""

    def __init__(self, shape: TowerShape, tap_layer: int = -1):
        super().__init__()
        self.embeddings = bert_embeddings(shape)
        dpr = torch.linspace(0, shape.drop_path, shape.depth).tolist()
        self.blocks = nn.ModuleList(
            Block(shape.width, shape.heads, mlp_ratio=shape.mlp_ratio, qkv_bias=True, drop_path=dpr[i])
            for i in range(shape.depth))
        self.norm = nn.LayerNorm(shape.width, eps=1e-6)
        layer = resolve_layer(tap_layer, shape.depth, "loss.student_layer")
        self.tap = QKTap(self.blocks[layer].attn.qkv, shape.heads)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """All token states [B, N, C]; with ``cls_only`` just the [CLS] state [B, 1, C]."""
        x = self.embeddings(input_ids=input_ids)
        mask = additive_mask(attention_mask, x.dtype)
        for blk in self.blocks[:-1] if cls_only else self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, mask, use_reentrant=False)
            else:
                x = blk(x, attn_mask=mask)
        if cls_only:
            x = cls_only_block(self.blocks[-1], x, mask)
        return self.norm(x)


class DualEncoder(nn.Module, Exportable):
    """The DiDE student.

    ``encode_image`` / ``encode_text`` run one tower each (cacheable); ``pool_image`` /
    ``pool_text`` are each tower's pooler (Linear + tanh on [CLS], as ViLT and DiDE);
    ``fuse`` is the only place the modalities meet; ``classify`` applies the task head.
    """

    def __init__(self, shape: TowerShape, task: str, num_classes: int, tap_layer: int = -1,
                 itc_temperature: float = 0.07):
        super().__init__()
        self.shape, self.task, self.num_classes = shape, task, num_classes
        self.labels: list[str] | None = None  # output names of the head, in order (exported as id2label)
        h = shape.width
        self.image = ImageTower(shape, tap_layer)
        self.text = TextTower(shape, tap_layer)
        self.image_pooler = pooler(h)
        self.text_pooler = pooler(h)
        self.fusion = mlp_head(2 * h, 2 * h, h)
        if task == "itm":
            self.head = nn.Linear(h, 2)
        elif task == "nlvr2":
            self.head = mlp_head(2 * h, 2 * h, 2)
        else:  # vqa, snli_ve
            self.head = mlp_head(h, 2 * h, num_classes)
        # contrastive projections (pre-training ITC and hard-negative mining)
        self.itc_image = nn.Linear(h, h)
        self.itc_text = nn.Linear(h, h)
        # log(1 / loss.itc_temperature); 1-d: DeepSpeed broadcasts bytes views
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / itc_temperature)))

    # -- towers --------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def set_capture(self, enable: bool) -> None:
        self.image.tap.enabled = self.text.tap.enabled = enable

    def encode_image(self, images: Images, cls_only: bool = False) -> torch.Tensor:
        return self.image(images, cls_only)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    cls_only: bool = False) -> torch.Tensor:
        return self.text(input_ids, attention_mask, cls_only)

    def pool_image(self, states: torch.Tensor) -> torch.Tensor:
        """[B, N, C] token states (or [B, 1, C]) -> the pooled image vector [B, C]."""
        return self.image_pooler(states[:, 0])

    def pool_text(self, states: torch.Tensor) -> torch.Tensor:
        return self.text_pooler(states[:, 0])

    def take_qk(self, text_mask: torch.Tensor, images: Images) -> CrossQK:
        """Queries/keys captured at the tapped block by the last encode_text/encode_image."""
        q_t, k_t = self.text.tap.take()
        q_i, k_i = self.image.tap.take()
        return CrossQK(q_t, k_t, q_i, k_i, text_mask.bool(), images.token_mask())

    # -- interaction ---------------------------------------------------------------------
    def fuse(self, text_cls: torch.Tensor, image_cls: torch.Tensor) -> torch.Tensor:
        """Fused vector from the two pooled vectors (``pool_text`` / ``pool_image``)."""
        return self.fusion(torch.cat([text_cls, image_cls], dim=-1))

    def classify(self, text_cls, image_cls, image_cls2=None) -> torch.Tensor:
        if self.task == "nlvr2":
            if image_cls2 is None:
                raise ValueError("nlvr2 needs two images")
            return self.head(torch.cat([self.fuse(text_cls, image_cls), self.fuse(text_cls, image_cls2)], -1))
        return self.head(self.fuse(text_cls, image_cls))

    def contrastive_embeddings(self, text_cls, image_cls) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised contrastive embeddings (text, image) from the pooled vectors."""
        return F.normalize(self.itc_text(text_cls), dim=-1), F.normalize(self.itc_image(image_cls), dim=-1)

    def forward(self, images: Images, input_ids, attention_mask, images2: Images | None = None,
                capture: bool = False, negatives=None, generator: torch.Generator | None = None) -> ModelOutput:
        """The student's whole share of a training/eval step (one module call, so DeepSpeed
        ZeRO-3 gathers every parameter it touches).

        For ``task='itm'`` the rows are [positives; (text, negative image); (negative text,
        image)], where ``negatives`` (the training side's chooser, e.g.
        ``dide_scale.negatives.HardNegatives``) picks the negative rows from the contrastive
        embeddings, scaled by the contrastive temperature, drawing from ``generator``;
        ``rows`` holds each row's inputs and ``embeddings`` the contrastive embeddings with
        their scale, for the ITC loss.
        """
        self.set_capture(capture)
        text = self.encode_text(input_ids, attention_mask)
        image = self.encode_image(images)
        qk = [self.take_qk(attention_mask, images)] if capture else []
        t_cls, i_cls = self.pool_text(text), self.pool_image(image)
        out = ModelOutput(logits=None, qk=qk)
        if self.task == "itm":
            if negatives is None:
                raise ValueError("an ITM forward needs `negatives`, the chooser of its negative rows "
                                 "(dide_scale.negatives.HardNegatives)")
            t_emb, i_emb = self.contrastive_embeddings(t_cls, i_cls)
            scale = self.logit_scale.exp().clamp(max=100)
            out.embeddings = (t_emb, i_emb, scale)
            q = qk[0] if capture else None
            img_side = [i_cls, *images.tensors()] + ([q.q_image, q.k_image] if capture else [])
            txt_side = [t_cls, input_ids, attention_mask] + ([q.q_text, q.k_text] if capture else [])
            neg_i, neg_t, out.stats["itm/local_fallback"] = negatives(t_emb, i_emb, scale.detach(), img_side,
                                                                      txt_side, generator)

            # rows: [positives; (text, negative image); (negative text, image)]
            def text_rows(k):
                return torch.cat([txt_side[k], txt_side[k], neg_t[k]])

            def image_rows(k):
                return torch.cat([img_side[k], neg_i[k], img_side[k]])
            out.logits = self.head(self.fuse(text_rows(0), image_rows(0)))
            row_images = Images(image_rows(1), image_rows(2), image_rows(3))
            out.rows = {"images": row_images, "input_ids": text_rows(1), "attention_mask": text_rows(2)}
            if capture:
                out.qk = [CrossQK(text_rows(3), text_rows(4), image_rows(4), image_rows(5),
                                  out.rows["attention_mask"].bool(), row_images.token_mask())]
        elif self.task == "nlvr2":
            image2 = self.encode_image(images2)
            if capture:
                q_i, k_i = self.image.tap.take()
                out.qk.append(CrossQK(qk[0].q_text, qk[0].k_text, q_i, k_i, qk[0].text_mask, images2.token_mask()))
            out.logits = self.classify(t_cls, i_cls, self.pool_image(image2))
        else:
            out.logits = self.classify(t_cls, i_cls)
        self.set_capture(False)
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters that take optim.head_lr_mult: the task head only (the fusion MLP and the
        poolers train at the base rate, as in ViLT/DiDE's lr_mult)."""
        return list(self.head.parameters())

    model_type = "dide_dual_encoder"
