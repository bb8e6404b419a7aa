"""DistillTask: the student, the frozen teacher and the losses in one place.

``training_forward(batch)`` returns the loss and its named parts.  The teacher is held
outside the student's module tree, so it never reaches the optimizer or a student
checkpoint, and it always runs in eval mode under ``no_grad``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import losses
from .config import LossConfig


@dataclass
class StepOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    logits: torch.Tensor
    labels: torch.Tensor | None
    timings: dict[str, float] = field(default_factory=dict)


def batch_to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """uint8 pixels -> ``dtype`` in [0, 1] on ``device``; token ids/labels moved as they are."""
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
        elif k.startswith("pixels"):
            out[k] = v.to(device, non_blocking=True).to(dtype).div_(255.0)
        elif v.is_floating_point():
            out[k] = v.to(device, non_blocking=True).float()
        else:
            out[k] = v.to(device, non_blocking=True)
    return out


class DistillTask:
    """Student (a callable: the DeepSpeed engine or the bare module) + teacher + losses."""

    def __init__(self, student: Callable, teacher: Callable | None, loss_cfg: LossConfig, task: str,
                 sync: Callable[[], None] | None = None):
        self.student, self.teacher, self.cfg, self.task = student, teacher, loss_cfg, task
        self._sync = sync or (lambda: None)  # device sync used only when timing is requested
        if teacher is None and loss_cfg.distills():
            raise ValueError("distillation weights are set but no teacher was given")
        self.teacher_module = getattr(teacher, "module", teacher)
        if self.teacher_module is not None:
            self.teacher_module.eval()
            self.teacher_module.requires_grad_(False)

    def train(self, mode: bool = True) -> "DistillTask":
        getattr(self.student, "module", self.student).train(mode)
        if self.teacher_module is not None:
            self.teacher_module.eval()  # never dropout / drop-path in the teacher
        return self

    @torch.no_grad()
    def teacher_forward(self, b: dict, pairs, capture: bool):
        """(logits, [CrossQK]) of the teacher on the rows the student scored."""
        if pairs is not None:
            t_idx, i_idx = pairs
            out = self.teacher(b["pixels"][i_idx], b["input_ids"][t_idx], b["attention_mask"][t_idx],
                               capture=capture)
        else:
            out = self.teacher(b["pixels"], b["input_ids"], b["attention_mask"], b.get("pixels2"), capture=capture)
        return out if isinstance(out, tuple) else (out.logits, out.qk)

    def training_forward(self, b: dict, timed: bool = False) -> StepOutput:
        cfg = self.cfg
        capture = cfg.attn_t2i > 0 or cfg.attn_i2t > 0
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        s = self.student(b["pixels"], b["input_ids"], b["attention_mask"], b.get("pixels2"),
                         capture=capture, itc=cfg.itc > 0)
        parts: dict[str, torch.Tensor] = {}
        labels = self.labels(b, s)
        if self.teacher is not None and cfg.distills():
            if timed:
                self._sync()
            t1 = time.perf_counter()
            t_logits, t_qk = self.teacher_forward(b, s.pairs, capture)
            if timed:
                self._sync()
                timings["teacher_forward"] = time.perf_counter() - t1
            if capture:
                parts["attn_t2i"], parts["attn_i2t"] = losses.cross_attention_losses(t_qk, s.qk, cfg.head_map)
            if cfg.soft_label > 0:
                parts["soft_label"] = (losses.soft_label_bce if self.task == "vqa" else losses.soft_label_kl)(
                    s.logits, t_logits, cfg.temperature)
        if cfg.ground_truth > 0:
            parts["ground_truth"] = (losses.vqa_ground_truth(s.logits, labels) if self.task == "vqa"
                                     else F.cross_entropy(s.logits.float(), labels))
        if s.itc_loss is not None:
            parts["itc"] = s.itc_loss
        weights = {"attn_t2i": cfg.attn_t2i, "attn_i2t": cfg.attn_i2t, "soft_label": cfg.soft_label,
                   "ground_truth": cfg.ground_truth, "itc": cfg.itc}
        loss = sum(weights[k] * v for k, v in parts.items())
        timings["student_forward"] = time.perf_counter() - t0 - timings.get("teacher_forward", 0.0)
        return StepOutput(loss, parts, s.logits, labels, timings)

    def labels(self, b: dict, s) -> torch.Tensor | None:
        if self.task == "itm":  # rows: B positives then 2B mined negatives
            n = s.logits.shape[0] // 3
            y = torch.zeros(3 * n, dtype=torch.long, device=s.logits.device)
            y[:n] = 1
            return y
        return b.get("labels")
