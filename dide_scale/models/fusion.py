"""The project's own fusion-encoder teacher: one transformer over ``[text ; image]``
(ViLT: BERT embeddings + ViT patch embeddings + a modality-type embedding, pre-LN blocks).

Built from timm's NaFlexViT (linear patch embedding over patch sequences, a position
table interpolated to each image's grid as ViLT does, pre-LN blocks) and transformers'
BertEmbeddings, so a ViLT checkpoint maps onto it name by name.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import QKTap, additive_mask, joint_outputs, resolve_layer, run_tapped
from .blocks import TowerShape, bert_embeddings, mlp_head, naflex_vit, pooler
from .caption import CaptionHead, Generation, additive, seq2seq_mask
from .hub import Exportable
from .images import Images, Normalize
from .output import ModelOutput


class FusionEncoder(nn.Module, Exportable):
    """ViLT-style fusion model with a task head.

    ``forward`` returns the task logits; with ``capture=True`` it also returns one
    :class:`CrossQK` per image (two for NLVR2) cut from the joint sequence at ``tap_layer``;
    with ``layers=(i, j, ...)`` one :class:`JointStates` per image with those blocks'
    queries, keys and outputs (layer-to-layer distillation, DistillVLM).

    For ``task='itm'`` in training mode the rows are [positives; (text, other image);
    (other text, image)] with the other image/text drawn at random from the micro-batch
    (never the pair itself; a fusion model has no cheap similarity to mine hard negatives
    with), as the dual encoder's rows; ``rows`` holds each row's inputs for the teacher.
    In eval mode (a teacher, or scoring) it scores the rows it is given.

    For ``task='caption'`` the sequence is read under the seq2seq mask of ``models.caption``
    and the head is an MLM head over the vocabulary: ``positions`` [B, Nt] bool picks the
    caption slots whose logits are returned ([M, vocab]; all slots [B, Nt, vocab] without it).
    ``generation`` holds the decoding defaults an export carries.
    """

    def __init__(self, shape: TowerShape, task: str, num_classes: int, tap_layer: int = -1):
        super().__init__()
        self.shape, self.task, self.num_classes = shape, task, num_classes
        self.labels: list[str] | None = None  # output names of the head, in order (exported as id2label)
        h = shape.width
        self.normalize = Normalize()
        self.text_embeddings = bert_embeddings(shape)
        self.token_type = nn.Embedding(3, h)  # 0 text, 1 image, 2 second image (NLVR2)
        # std 0.02 as ViLT/BERT: at nn.Embedding's std 1 the modality vector swamps the
        # patch content in every image token and training stalls on a long plateau
        nn.init.trunc_normal_(self.token_type.weight, std=0.02)
        self.vit = naflex_vit(shape)  # its embeds, blocks and final norm; our own joint forward
        self.pooler = pooler(h) if task != "caption" else None  # a captioner reads every text slot, not [CLS]
        self.generation: Generation | None = None
        if task == "caption":
            self.head = CaptionHead(h, shape.vocab_size)
            self.generation = Generation()
        elif task == "itm":  # 2-way matching; 1: a ranking score (a retrieval checkpoint's rank_output)
            self.head = nn.Linear(h, num_classes)
        elif task == "nlvr2":
            self.head = mlp_head(2 * h, 2 * h, 2)
        else:
            self.head = mlp_head(h, 2 * h, num_classes)
        self.tap_layer = resolve_layer(tap_layer, shape.depth, "loss.teacher_layer")
        self.taps = [QKTap(blk.attn.qkv, shape.heads) for blk in self.vit.blocks]  # idle unless enabled
        self.distill_proj: nn.ModuleList | None = None
        self.grad_checkpointing = False

    @property
    def num_heads(self) -> int:
        return self.shape.heads

    @property
    def depth(self) -> int:
        return self.shape.depth

    @property
    def width(self) -> int:
        return self.shape.width

    @property
    def patch_size(self) -> int:
        return self.shape.patch_size

    @property
    def mlp_ratio(self) -> float:
        return self.shape.mlp_ratio

    @property
    def itm_form(self) -> str:
        """'pair': a 2-way ITM head (per-pair soft labels); 'rank': one ranking score per pair
        (soft labels over each anchor's candidates, ``losses.itm_listwise_kl``)."""
        return "rank" if self.task == "itm" and self.num_classes == 1 else "pair"

    def add_distill_projections(self, n: int, teacher_width: int) -> None:
        """Linear maps of the student's block outputs to the teacher's width (token NCE), one
        per mapped block pair.  Trained with the student, dropped from exports."""
        self.distill_proj = nn.ModuleList(nn.Linear(self.shape.width, teacher_width) for _ in range(n))

    training_only = ("distill_proj.",)  # exists only for training: exports drop it

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def type_embedding(self, type_id: int, like: torch.Tensor) -> torch.Tensor:
        """The modality-type vector [1, 1, C], through the embedding module's own call (ZeRO-3
        gathers a module's parameters when it is called; its weight indexed directly is an
        empty shard there)."""
        return self.token_type(torch.full((1, 1), type_id, dtype=torch.long, device=like.device))

    def embed_image(self, images: Images, type_id: int) -> torch.Tensor:
        x, _ = self.vit.embeds(self.normalize(images.patches), patch_coord=images.coord, patch_valid=images.valid)
        return x + self.type_embedding(type_id, x)  # [CLS] + patches

    def _run_blocks(self, x, add, layers: tuple[int, ...]):
        """The blocks over the joint sequence: (output, {block: its output} for ``layers``)."""
        hidden = {}
        for i, blk in enumerate(self.vit.blocks):
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, add, use_reentrant=False)
            else:
                x = blk(x, attn_mask=add)
            if i in layers:
                hidden[i] = x
        return x, hidden

    def joint(self, images: Images, input_ids, attention_mask, type_id: int = 1, capture: bool = False,
              layers: tuple[int, ...] = ()):
        """(pooled state, CrossQK or None, JointStates or None) of one (text, image) pass."""
        text = self.text_embeddings(input_ids=input_ids)
        text = text + self.type_embedding(0, text)
        image = self.embed_image(images, type_id)
        x = torch.cat([text, image], dim=1)
        mask = torch.cat([attention_mask.bool(), images.token_mask()], dim=1)
        allowed = seq2seq_mask(attention_mask, images.token_mask()) if self.task == "caption" else None
        add = additive_mask(mask, x.dtype) if allowed is None else additive(allowed, x.dtype)
        (x, hidden), qks = run_tapped(self.taps, set(layers) | ({self.tap_layer} if capture else set()),
                                      lambda: self._run_blocks(x, add, layers))
        # what the head reads: the pooled [CLS], or a captioner's every text slot
        x = self.vit.norm(x)
        pooled = x[:, : input_ids.shape[1]] if self.pooler is None else self.pooler(x[:, 0])
        h = [hidden[i] for i in layers]
        if layers and self.distill_proj is not None:
            if len(self.distill_proj) != len(layers):
                raise ValueError(f"{len(layers)} mapped blocks but {len(self.distill_proj)} distillation "
                                 "projections (loss.layer_map changed since the model was built?)")
            h = [proj(v) for proj, v in zip(self.distill_proj, h)]
        return (pooled, *joint_outputs(qks, self.tap_layer if capture else None, attention_mask, layers, h, mask,
                                       images.token_mask(), allowed))

    def forward(self, images: Images, input_ids, attention_mask, images2: Images | None = None,
                capture: bool = False, layers: tuple[int, ...] = (), positions: torch.Tensor | None = None
                ) -> ModelOutput:
        """Scores the (text, image) rows it is given (ITM training picks its negative rows
        beforehand, on the training side); a captioner predicts the tokens at ``positions``."""
        pooled, out = joint_passes(self.joint, images, input_ids, attention_mask, images2, capture, layers,
                                   self.task == "nlvr2")
        out.logits = self.head(pooled if positions is None else pooled[positions])
        return out

    def export_config(self) -> dict:
        cfg = super().export_config()
        if self.generation is not None:
            cfg["generation"] = dataclasses.asdict(self.generation)
        return cfg

    @classmethod
    def from_config(cls, cfg: dict, tap_layer: int = -1):
        model = super().from_config(cfg, tap_layer)
        if model.generation is not None and "generation" in cfg:
            model.generation = Generation(**cfg["generation"])
        return model

    def head_parameters(self) -> list[nn.Parameter]:
        """The task head only (optim.head_lr_mult), as ViLT's lr_mult."""
        return list(self.head.parameters())

    model_type = "dide_fusion"


def joint_passes(joint, images: Images, input_ids, attention_mask, images2: Images | None, capture: bool,
                 layers: tuple[int, ...], nlvr2: bool) -> tuple[torch.Tensor, ModelOutput]:
    """One ``joint`` pass (two for NLVR2: the text with each image, image token types 1 and 2)
    of a fusion model: (pooled state, the two concatenated for NLVR2; a ModelOutput holding
    every pass's CrossQK / JointStates, logits still to fill)."""
    pooled, qk, states = joint(images, input_ids, attention_mask, 1, capture, layers)
    out = ModelOutput(None, [qk] if capture else [], states=[states] if layers else [])
    if nlvr2:
        if images2 is None:
            raise ValueError("nlvr2 needs two images")
        pooled2, qk2, states2 = joint(images2, input_ids, attention_mask, 2, capture, layers)
        out.qk += [qk2] if capture else []
        out.states += [states2] if layers else []
        pooled = torch.cat([pooled, pooled2], -1)
    return pooled, out
