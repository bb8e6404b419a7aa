"""The blocks both model families are built of: the tower shape, timm's NaFlexViT set up as ViLT
embeds images, BERT's embeddings, the pooler and the MLP head.  The dual-encoder student
(``student.py``) and the fusion encoder (``fusion.py``) share them; ``hub.py`` reads a
``TowerShape`` back from an exported config.

Plain ``nn.Module``s: no parallelism API is imported here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings


@dataclass
class TowerShape:
    """Shape arguments of both towers (a model-side mirror of config.ArchConfig)."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 32
    image_size: list[int] = field(default_factory=lambda: [384, 384])  # what the position table covers
    max_text_len: int = 40
    vocab_size: int = 30522
    drop_path: float = 0.0

    @classmethod
    def from_arch(cls, arch) -> "TowerShape":
        return cls(**{k: getattr(arch, k) for k in cls.__dataclass_fields__})


def bert_embeddings(shape: TowerShape) -> BertEmbeddings:
    """BERT word + position + token-type embeddings (transformers' own module), initialised
    as BERT does (normal, std 0.02: a bare nn.Embedding would start at std 1)."""
    emb = BertEmbeddings(BertConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.width, max_position_embeddings=shape.max_text_len,
        type_vocab_size=2, hidden_dropout_prob=0.0, layer_norm_eps=1e-12))
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        nn.init.normal_(table.weight, std=0.02)
    return emb


def pooler(width: int) -> nn.Sequential:
    """Linear + tanh on token 0 (ViLT's and DiDE's pooler)."""
    return nn.Sequential(nn.Linear(width, width), nn.Tanh())


def naflex_vit(shape: TowerShape, drop_path: float = 0.0) -> NaFlexVit:
    """timm's NaFlexViT over patch sequences, set up as ViLT embeds images: a linear patch
    embedding, a [CLS] token, and a learned position table over ``shape.image_size`` that is
    interpolated to each image's own grid (bilinear, corners aligned, sampled at the patch
    coordinates so shapes stay static).  Pre-LN timm ``Block``s, final LayerNorm; initialised as
    timm's classic ``VisionTransformer``."""
    grid = (shape.image_size[0] // shape.patch_size, shape.image_size[1] // shape.patch_size)
    cfg = NaFlexVitCfg(
        patch_size=shape.patch_size, embed_dim=shape.width, depth=shape.depth, num_heads=shape.heads,
        mlp_ratio=shape.mlp_ratio, class_token=True, global_pool="token", pos_embed_grid_size=grid,
        pos_embed_interp_mode="bilinear", pos_embed_align_corners=True, pos_embed_antialias=False,
        pos_embed_use_grid_sample=True, use_key_only_attn_mask=True, drop_path_rate=drop_path, fix_init=False)
    vit = NaFlexVit(cfg, num_classes=0)
    # the initialisation of timm's classic ViT: its Conv2d patch embedding keeps PyTorch's
    # default init (a Linear's is the same distribution), not the trunc-normal 0.02 of other Linears
    vit.embeds.proj.reset_parameters()
    return vit


def mlp_head(dim_in: int, dim_hidden: int, dim_out: int) -> nn.Sequential:
    """Linear -> LayerNorm -> GELU -> Linear (the paper's fusion / classifier shape)."""
    return nn.Sequential(nn.Linear(dim_in, dim_hidden), nn.LayerNorm(dim_hidden), nn.GELU(),
                         nn.Linear(dim_hidden, dim_out))
