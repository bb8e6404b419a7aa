"""The project's own fusion-encoder teacher: one transformer over ``[text ; image]``
(ViLT: BERT embeddings + ViT patch embeddings + a modality-type embedding, pre-LN blocks).

Built from timm's VisionTransformer (patch embedding, position embedding, blocks) and
transformers' BertEmbeddings, so a ViLT checkpoint maps onto it name by name.
"""
from __future__ import annotations

from dataclasses import asdict

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .attention import CrossQK, QKTap, additive_mask, resolve_layer
from .student import Normalize, StudentOutput, TowerShape, bert_embeddings, mlp_head


class FusionEncoder(nn.Module):
    """ViLT-style fusion model with a task head.

    ``forward`` returns the task logits; with ``capture=True`` it also returns one
    :class:`CrossQK` per image (two for NLVR2) cut from the joint sequence at ``tap_layer``.
    """

    def __init__(self, shape: TowerShape, task: str, num_classes: int, tap_layer: int = -1):
        super().__init__()
        self.shape, self.task, self.num_classes = shape, task, num_classes
        h = shape.width
        self.normalize = Normalize()
        self.text_embeddings = bert_embeddings(shape)
        self.token_type = nn.Embedding(3, h)  # 0 text, 1 image, 2 second image (NLVR2)
        # std 0.02 as ViLT/BERT: at nn.Embedding's std 1 the modality vector swamps the
        # patch content in every image token and training stalls on a long plateau
        nn.init.trunc_normal_(self.token_type.weight, std=0.02)
        self.vit = VisionTransformer(
            img_size=tuple(shape.image_size), patch_size=shape.patch_size, embed_dim=h, depth=shape.depth,
            num_heads=shape.heads, mlp_ratio=shape.mlp_ratio, num_classes=0, dynamic_img_size=True)
        self.pooler = nn.Sequential(nn.Linear(h, h), nn.Tanh())
        if task == "itm":
            self.head = nn.Linear(h, 2)
        elif task == "nlvr2":
            self.head = mlp_head(2 * h, 2 * h, 2)
        else:
            self.head = mlp_head(h, 2 * h, num_classes)
        self.tap_layer = resolve_layer(tap_layer, shape.depth, "loss.teacher_layer")
        self.tap = QKTap(self.vit.blocks[self.tap_layer].attn.qkv, shape.heads)

    @property
    def num_heads(self) -> int:
        return self.shape.heads

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def embed_image(self, pixels: torch.Tensor, type_id: int) -> torch.Tensor:
        x = self.vit._pos_embed(self.vit.patch_embed(self.normalize(pixels)))  # [CLS] + patches
        return x + self.token_type.weight[type_id]

    def joint(self, pixels, input_ids, attention_mask, type_id: int = 1, capture: bool = False):
        """Pooled state of one (text, image) pass, and its CrossQK when capturing."""
        text = self.text_embeddings(input_ids=input_ids) + self.token_type.weight[0]
        image = self.embed_image(pixels, type_id)
        nt = text.shape[1]
        x = torch.cat([text, image], dim=1)
        mask = torch.cat([attention_mask.bool(),
                          torch.ones(image.shape[:2], dtype=torch.bool, device=x.device)], dim=1)
        add = additive_mask(mask, x.dtype)
        self.tap.enabled = capture
        for blk in self.vit.blocks:
            x = blk(x, attn_mask=add)
        x = self.vit.norm(x)
        pooled = self.pooler(x[:, 0])
        if not capture:
            return pooled, None
        q, k = self.tap.take()
        self.tap.enabled = False
        qk = CrossQK(q[:, :, :nt], k[:, :, :nt], q[:, :, nt:], k[:, :, nt:], attention_mask.bool())
        return pooled, qk

    def forward(self, pixels, input_ids, attention_mask, pixels2=None, capture: bool = False,
                itc: bool = False) -> StudentOutput:
        if itc:
            raise ValueError("a fusion model has no separate embeddings for a contrastive loss")
        pooled, qk = self.joint(pixels, input_ids, attention_mask, 1, capture)
        if self.task == "nlvr2":
            if pixels2 is None:
                raise ValueError("nlvr2 needs two images")
            pooled2, qk2 = self.joint(pixels2, input_ids, attention_mask, 2, capture)
            return StudentOutput(self.head(torch.cat([pooled, pooled2], -1)), [qk, qk2] if capture else [])
        return StudentOutput(self.head(pooled), [qk] if capture else [])

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.pooler.parameters(), *self.head.parameters()]

    def export_config(self) -> dict:
        return {"model_type": "dide_fusion", "task": self.task, "num_classes": self.num_classes,
                "shape": asdict(self.shape)}
