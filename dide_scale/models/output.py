"""What every model call returns: the students and, in the same shape, the teachers."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .attention import CrossQK, JointStates


@dataclass
class ModelOutput:
    """``logits``; ``qk`` one CrossQK per image pass when capturing; ``rows`` for ITM: the
    inputs of every scored (text, image) row (``images``, ``input_ids``, ``attention_mask``;
    negatives may come from other ranks), which the teacher scores too; ``embeddings`` the
    dual encoder's contrastive (text, image, scale) for ITC; ``states`` one JointStates per
    image pass of a fusion model asked for ``layers``; ``stats`` device scalars for
    monitoring (e.g. ITM negatives replaced by local ones)."""

    logits: torch.Tensor | None
    qk: list[CrossQK]
    rows: dict | None = None
    embeddings: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    states: list[JointStates] = field(default_factory=list)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
