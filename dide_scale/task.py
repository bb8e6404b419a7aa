"""DistillTask: the student, the frozen teacher and the losses in one place.

``training_forward(batch)`` returns the loss and its named parts.  The teacher is held
outside the student's module tree, so it never reaches the optimizer or a student
checkpoint, and it always runs in eval mode under ``no_grad``.

Visual-token alignment: the teacher and the student must see the same image regions as
the same tokens.  When their patch sizes differ but their patch grids are equal, the
teacher gets the student's pixels resampled to ``grid x teacher patch`` (antialiased
bilinear); grids that differ are refused when the models are built
(``models.build.check_pairing``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import losses
from .config import LossConfig
from .models.attention import resolve_layer_map


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
        student_module = getattr(student, "module", student)
        self.t_layers: tuple[int, ...] = ()
        self.s_layers: tuple[int, ...] = ()
        self.queue: losses.TokenQueue | None = None
        self.teacher_image_size: list[int] | None = None
        if self.teacher_module is not None:
            self.teacher_image_size = teacher_pixels_size(self.teacher_module, student_module.shape)
        if loss_cfg.layerwise():
            t, s = resolve_layer_map(loss_cfg.layer_map, self.teacher_module.depth, student_module.shape.depth)
            self.t_layers, self.s_layers = tuple(t), tuple(s)
            if loss_cfg.token_nce > 0:
                self.queue = losses.TokenQueue(len(t), loss_cfg.nce_queue_size)

    def train(self, mode: bool = True) -> "DistillTask":
        getattr(self.student, "module", self.student).train(mode)
        if self.teacher_module is not None:
            self.teacher_module.eval()  # never dropout / drop-path in the teacher
        return self

    def teacher_pixels(self, pixels: torch.Tensor | None) -> torch.Tensor | None:
        """The student's pixels at the teacher's resolution (same patch grid, see the module doc)."""
        if pixels is None or self.teacher_image_size is None:
            return pixels
        return F.interpolate(pixels, size=self.teacher_image_size, mode="bilinear", align_corners=False,
                             antialias=True).clamp_(0, 1)

    @torch.no_grad()
    def teacher_forward(self, b: dict, rows: dict | None, capture: bool, layers: tuple[int, ...] = ()):
        """The teacher's output (logits, CrossQKs, JointStates) on the rows the student scored
        (``rows``: the ITM rows' inputs, negatives included; else the batch itself)."""
        src = rows if rows is not None else b
        pixels, pixels2 = self.teacher_pixels(src["pixels"]), self.teacher_pixels(src.get("pixels2"))
        kw = {"layers": layers} if layers else {}
        return self.teacher(pixels, src["input_ids"], src["attention_mask"], pixels2, capture=capture, **kw)

    def training_forward(self, b: dict, timed: bool = False) -> StepOutput:
        cfg = self.cfg
        capture = cfg.attn_t2i > 0 or cfg.attn_i2t > 0
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        kw = {"layers": self.s_layers} if self.s_layers else {}
        s = self.student(b["pixels"], b["input_ids"], b["attention_mask"], b.get("pixels2"),
                         capture=capture, itc=cfg.itc > 0, **kw)
        parts: dict[str, torch.Tensor] = {}
        labels = self.labels(b, s)
        if self.teacher is not None and cfg.distills():
            if timed:
                self._sync()
            t1 = time.perf_counter()
            t = self.teacher_forward(b, s.rows, capture, self.t_layers)
            if timed:
                self._sync()
                timings["teacher_forward"] = time.perf_counter() - t1
            if capture:
                parts["attn_t2i"], parts["attn_i2t"] = losses.cross_attention_losses(t.qk, s.qk, cfg.head_map)
            if cfg.soft_label > 0:
                parts["soft_label"] = (losses.soft_label_bce if self.task == "vqa" else losses.soft_label_kl)(
                    s.logits, t.logits, cfg.temperature)
            if cfg.attn_mse > 0:
                parts["attn_mse"] = losses.layer_attention_mse(t.states, s.states, cfg.head_map)
            if self.queue is not None:
                parts["token_nce"] = self.token_nce(t.states, s.states)
        if cfg.ground_truth > 0:
            parts["ground_truth"] = (losses.vqa_ground_truth(s.logits, labels) if self.task == "vqa"
                                     else F.cross_entropy(s.logits.float(), labels))
        if s.itc_loss is not None:
            parts["itc"] = s.itc_loss
        weights = {"attn_t2i": cfg.attn_t2i, "attn_i2t": cfg.attn_i2t, "soft_label": cfg.soft_label,
                   "ground_truth": cfg.ground_truth, "itc": cfg.itc, "attn_mse": cfg.attn_mse,
                   "token_nce": cfg.token_nce}
        loss = sum(weights[k] * v for k, v in parts.items())
        timings["student_forward"] = time.perf_counter() - t0 - timings.get("teacher_forward", 0.0)
        return StepOutput(loss, parts, s.logits, labels, timings)

    def token_nce(self, teacher_states: list, student_states: list) -> torch.Tensor:
        """Token NCE over mapped pairs and image passes against the queue as it was before this
        micro-batch; then this micro-batch's teacher tokens (all ranks) join the queue."""
        vals, new = [], [[] for _ in self.t_layers]
        for t, s in zip(teacher_states, student_states, strict=True):
            for p, (th, sh) in enumerate(zip(t.hidden, s.hidden, strict=True)):
                vals.append(losses.token_nce(sh, th, s.mask, self.queue.negatives(p, th), self.cfg.nce_temperature))
                new[p].append(th[s.mask])
        self.queue.push([torch.cat(rows) for rows in new])
        return torch.stack(vals).mean()

    def labels(self, b: dict, s) -> torch.Tensor | None:
        if self.task == "itm":  # rows: B positives then 2B mined negatives
            n = s.logits.shape[0] // 3
            y = torch.zeros(3 * n, dtype=torch.long, device=s.logits.device)
            y[:n] = 1
            return y
        return b.get("labels")


def teacher_pixels_size(teacher, student_shape) -> list[int] | None:
    """The resolution the teacher must see so its patches cover the student's one to one, or
    None when the student's pixels serve as they are (same patch size)."""
    t_patch = getattr(teacher, "patch_size", None)
    if t_patch is None or t_patch == student_shape.patch_size:
        return None
    grid = [side // student_shape.patch_size for side in student_shape.image_size]
    return [g * t_patch for g in grid]
