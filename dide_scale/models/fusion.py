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
from torch.utils.checkpoint import checkpoint

from .attention import QKTap, additive_mask, joint_outputs, resolve_layer, run_tapped
from .student import Normalize, StudentOutput, TowerShape, bert_embeddings, mlp_head


class FusionEncoder(nn.Module):
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
        self.taps = [QKTap(blk.attn.qkv, shape.heads) for blk in self.vit.blocks]  # idle unless enabled
        self.distill_proj: nn.ModuleList | None = None

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

    def add_distill_projections(self, n: int, teacher_width: int) -> None:
        """Linear maps of the student's block outputs to the teacher's width (token NCE), one
        per mapped block pair.  Trained with the student, dropped from exports."""
        self.distill_proj = nn.ModuleList(nn.Linear(self.shape.width, teacher_width) for _ in range(n))

    # state-dict prefixes that exist only for training (save_pretrained drops them)
    training_only = ("distill_proj.",)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def embed_image(self, pixels: torch.Tensor, type_id: int) -> torch.Tensor:
        x = self.vit._pos_embed(self.vit.patch_embed(self.normalize(pixels)))  # [CLS] + patches
        return x + self.token_type.weight[type_id]

    def _run_blocks(self, x, add, layers: tuple[int, ...]):
        """The blocks over the joint sequence: (output, {block: its output} for ``layers``)."""
        hidden = {}
        for i, blk in enumerate(self.vit.blocks):
            if self.vit.grad_checkpointing and self.training:
                x = checkpoint(blk, x, add, use_reentrant=False)
            else:
                x = blk(x, attn_mask=add)
            if i in layers:
                hidden[i] = x
        return x, hidden

    def joint(self, pixels, input_ids, attention_mask, type_id: int = 1, capture: bool = False,
              layers: tuple[int, ...] = ()):
        """(pooled state, CrossQK or None, JointStates or None) of one (text, image) pass."""
        text = self.text_embeddings(input_ids=input_ids) + self.token_type.weight[0]
        image = self.embed_image(pixels, type_id)
        x = torch.cat([text, image], dim=1)
        mask = torch.cat([attention_mask.bool(),
                          torch.ones(image.shape[:2], dtype=torch.bool, device=x.device)], dim=1)
        add = additive_mask(mask, x.dtype)
        (x, hidden), qks = run_tapped(self.taps, set(layers) | ({self.tap_layer} if capture else set()),
                                      lambda: self._run_blocks(x, add, layers))
        pooled = self.pooler(self.vit.norm(x)[:, 0])
        h = [hidden[i] for i in layers]
        if layers and self.distill_proj is not None:
            if len(self.distill_proj) != len(layers):
                raise ValueError(f"{len(layers)} mapped blocks but {len(self.distill_proj)} distillation "
                                 "projections (loss.layer_map changed since the model was built?)")
            h = [proj(v) for proj, v in zip(self.distill_proj, h)]
        return (pooled, *joint_outputs(qks, self.tap_layer if capture else None, attention_mask, layers, h, mask))

    def forward(self, pixels, input_ids, attention_mask, pixels2=None, capture: bool = False,
                itc: bool = False, layers: tuple[int, ...] = ()) -> StudentOutput:
        if itc:
            raise ValueError("a fusion model has no separate embeddings for a contrastive loss")
        rows = None
        if self.task == "itm" and self.training:
            t_idx, i_idx = random_negative_rows(input_ids.shape[0], input_ids.device)
            pixels, input_ids, attention_mask = pixels[i_idx], input_ids[t_idx], attention_mask[t_idx]
            rows = {"pixels": pixels, "input_ids": input_ids, "attention_mask": attention_mask}
        pooled, out = joint_passes(self.joint, pixels, input_ids, attention_mask, pixels2, capture, layers,
                                   self.task == "nlvr2")
        out.rows = rows
        out.logits = self.head(pooled)
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.pooler.parameters(), *self.head.parameters()]

    def export_config(self) -> dict:
        return {"model_type": "dide_fusion", "task": self.task, "num_classes": self.num_classes,
                "shape": asdict(self.shape)}


def joint_passes(joint, pixels, input_ids, attention_mask, pixels2, capture: bool, layers: tuple[int, ...],
                 nlvr2: bool) -> tuple[torch.Tensor, StudentOutput]:
    """One ``joint`` pass (two for NLVR2: the text with each image, image token types 1 and 2)
    of a fusion model: (pooled state, the two concatenated for NLVR2; a StudentOutput holding
    every pass's CrossQK / JointStates, logits still to fill)."""
    pooled, qk, states = joint(pixels, input_ids, attention_mask, 1, capture, layers)
    out = StudentOutput(None, [qk] if capture else [], states=[states] if layers else [])
    if nlvr2:
        if pixels2 is None:
            raise ValueError("nlvr2 needs two images")
        pooled2, qk2, states2 = joint(pixels2, input_ids, attention_mask, 2, capture, layers)
        out.qk += [qk2] if capture else []
        out.states += [states2] if layers else []
        pooled = torch.cat([pooled, pooled2], -1)
    return pooled, out


def random_negative_rows(b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_idx, image_idx) [3B]: B positives, B (text, another image), B (another text, image);
    "another" is uniform over the rest of the micro-batch (global torch RNG, checkpointed)."""
    if b < 2:
        raise ValueError("ITM negatives need a micro-batch of at least 2 pairs")
    ar = torch.arange(b, device=device)
    other_img = (ar + torch.randint(1, b, (b,)).to(device)) % b
    other_txt = (ar + torch.randint(1, b, (b,)).to(device)) % b
    return torch.cat([ar, ar, other_txt]), torch.cat([ar, other_img, ar])
