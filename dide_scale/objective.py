"""DistillObjective: the student, the frozen teacher and the losses in one place.

``training_forward(batch)`` returns the loss and its named parts.  The teacher is held
outside the student's module tree, so it never reaches the optimizer or a student
checkpoint, and it always runs in eval mode under ``no_grad``.

Visual-token alignment: the teacher and the student must see the same image regions as
the same tokens.  Both take the same patch sequence (the student's patch grid of each
image, padding masked); when the teacher's patch size differs, each patch is resampled to
it (antialiased bilinear), so teacher token i still covers the region of student token i.

Label spaces: the teacher's logits are reordered into the student's labels by name
(``labels.LabelMap``) before they become soft labels; labels the teacher lacks are left
out of the loss.

Captioning: both models read the student's masked caption under the seq2seq mask and
predict the masked tokens (``caption_targets``); a captioner's labels are those tokens' ids,
its soft labels the teacher's distributions over the vocabulary at the same positions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from . import losses, negatives
from .config import LossConfig
from .labels import LabelMap
from .models.attention import resolve_layer_map
from .models.images import Images, from_batch, resample_patches
from .models.student import DualEncoder


@dataclass
class StepOutput:
    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    logits: torch.Tensor
    labels: torch.Tensor | None
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def batch_to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """uint8 patches -> ``dtype`` in [0, 1] on ``device``, gathered into ``images`` (and
    ``images2``) :class:`Images`; token ids/labels moved as they are."""
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            out[k] = v
        elif k.startswith("patches"):
            out[k] = v.to(device, non_blocking=True).to(dtype).div_(255.0)
        elif v.is_floating_point():
            out[k] = v.to(device, non_blocking=True).float()
        else:
            out[k] = v.to(device, non_blocking=True)
    for suffix in ("", "2"):
        images = from_batch(out, suffix)
        if images is not None:
            out[f"images{suffix}"] = images
    return out


class DistillObjective:
    """Student (a callable: the DeepSpeed engine or the bare module) + teacher + losses."""

    def __init__(self, student: Callable, teacher: Callable | None, loss_cfg: LossConfig, task: str,
                 sync: Callable[[], None] | None = None, label_map: LabelMap | None = None):
        self.student, self.teacher, self.cfg, self.task = student, teacher, loss_cfg, task
        self.label_map = None if label_map is None or label_map.identity and not label_map.missing else label_map
        self._sync = sync or (lambda: None)  # device sync used only when timing is requested
        if teacher is None and loss_cfg.distills():
            raise ValueError("distillation weights are set but no teacher was given")
        self.teacher_module = getattr(teacher, "module", teacher)
        if self.teacher_module is not None:
            self.teacher_module.eval()
            self.teacher_module.requires_grad_(False)
        student_module = getattr(student, "module", student)
        self.student_module = student_module
        self.dual = isinstance(student_module, DualEncoder)
        self.negatives = negatives.HardNegatives.from_config(loss_cfg) if task == "itm" and self.dual else None
        self.t_layers: tuple[int, ...] = ()
        self.s_layers: tuple[int, ...] = ()
        self.queue: losses.TokenQueue | None = None
        self.teacher_patch: int | None = None
        if self.teacher_module is not None and self.teacher_module.patch_size != student_module.shape.patch_size:
            self.teacher_patch = self.teacher_module.patch_size
        self.itm_form = getattr(self.teacher_module, "itm_form", None) or "pair"
        if loss_cfg.layerwise():
            t, s = resolve_layer_map(loss_cfg.layer_map, self.teacher_module.depth, student_module.shape.depth)
            self.t_layers, self.s_layers = tuple(t), tuple(s)
            if loss_cfg.token_nce > 0:
                self.queue = losses.TokenQueue(len(t), loss_cfg.nce_queue_size)

    def train(self, mode: bool = True) -> "DistillObjective":
        getattr(self.student, "module", self.student).train(mode)
        if self.teacher_module is not None:
            self.teacher_module.eval()  # never dropout / drop-path in the teacher
        return self

    def teacher_images(self, images: Images | None) -> Images | None:
        """The student's patches at the teacher's patch size (same grid, see the module doc)."""
        if images is None or self.teacher_patch is None:
            return images
        return resample_patches(images, self.teacher_patch)

    @torch.no_grad()
    def teacher_forward(self, b: dict, rows: dict | None, capture: bool, layers: tuple[int, ...] = ()):
        """The teacher's output (logits, CrossQKs, JointStates) on the rows the student scored
        (``rows``: the ITM rows' inputs, negatives included; else the batch itself)."""
        src = rows if rows is not None else b
        kw = {"layers": layers} if layers else {}
        if self.task == "caption":  # the teacher predicts the student's masked tokens
            kw["positions"] = b["caption_targets"] >= 0
        return self.teacher(self.teacher_images(src["images"]), src["input_ids"], src["attention_mask"],
                            self.teacher_images(src.get("images2")), capture=capture, **kw)

    def soft_label_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """Prediction distillation, in the student's label space."""
        T = self.cfg.temperature
        if self.task == "itm" and self.itm_form == "rank":
            return losses.itm_listwise_kl(student_logits, teacher_logits, T)
        present = None
        if self.label_map is not None:
            teacher_logits, present = self.label_map.apply(teacher_logits), self.label_map.on(teacher_logits.device)[1]
        if self.task == "vqa":
            return losses.soft_label_bce(student_logits, teacher_logits, T, present)
        return losses.soft_label_kl(student_logits, teacher_logits, T)

    def student_forward(self, b: dict, capture: bool, generator: torch.Generator | None = None,
                        layers: tuple[int, ...] = (), model: Callable | None = None):
        """The student (``model``, default the engine) on a device batch.  For ITM the rows it
        scores are chosen here: the dual encoder's hard negatives by ``self.negatives`` inside
        its forward (from its own embeddings), a training fusion student's random ones before
        it; either way ``rows`` of the output holds them, drawn from ``generator``."""
        model = model or self.student
        kw = {"layers": layers} if layers else {}
        if self.task == "caption":
            kw["positions"] = b["caption_targets"] >= 0
        if self.task == "itm" and self.dual:
            kw.update(negatives=self.negatives, generator=generator)
        elif self.task == "itm" and self.student_module.training:
            rows = negatives.random_rows(b, generator)
            s = model(rows["images"], rows["input_ids"], rows["attention_mask"], None, capture=capture, **kw)
            s.rows = rows
            return s
        return model(b["images"], b["input_ids"], b["attention_mask"], b.get("images2"), capture=capture, **kw)

    def training_forward(self, b: dict, timed: bool = False, generator: torch.Generator | None = None) -> StepOutput:
        """Loss and its named parts for one micro-batch.  ``generator`` (on the batch's
        device) serves every random draw the student makes (ITM negatives), so a step's
        randomness is a function of its key (``rng.step_rng``)."""
        cfg = self.cfg
        capture = cfg.attn_t2i > 0 or cfg.attn_i2t > 0
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        s = self.student_forward(b, capture, generator, self.s_layers)
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
                parts["soft_label"] = self.soft_label_loss(s.logits, t.logits)
            if cfg.attn_mse > 0:
                parts["attn_mse"] = losses.layer_attention_mse(t.states, s.states, cfg.head_map)
            if self.queue is not None:
                parts["token_nce"] = self.token_nce(t.states, s.states)
        if cfg.ground_truth > 0:  # a captioner's logits and labels are those of its masked tokens
            parts["ground_truth"] = (losses.vqa_ground_truth(s.logits, labels) if self.task == "vqa"
                                     else F.cross_entropy(s.logits.float(), labels))
        if cfg.itc > 0 and s.embeddings is not None:
            parts["itc"] = losses.contrastive(*s.embeddings)
        weights = {"attn_t2i": cfg.attn_t2i, "attn_i2t": cfg.attn_i2t, "soft_label": cfg.soft_label,
                   "ground_truth": cfg.ground_truth, "itc": cfg.itc, "attn_mse": cfg.attn_mse,
                   "token_nce": cfg.token_nce}
        loss = sum(weights[k] * v for k, v in parts.items())
        timings["student_forward"] = time.perf_counter() - t0 - timings.get("teacher_forward", 0.0)
        return StepOutput(loss, parts, s.logits, labels, timings, dict(s.stats))

    def token_nce(self, teacher_states: list, student_states: list) -> torch.Tensor:
        """Token NCE over mapped pairs and image passes against the queue as it was before this
        micro-batch; then this micro-batch's teacher tokens (all ranks) join the queue."""
        vals, new = [], [[] for _ in self.t_layers]
        for t, s in zip(teacher_states, student_states, strict=True):
            rows = losses.valid_rows(s.mask)  # the pass's one host sync: how many tokens are real
            for p, (th, sh) in enumerate(zip(t.hidden, s.hidden, strict=True)):
                vals.append(losses.token_nce(sh, th, s.mask, self.queue.negatives(p, th), self.cfg.nce_temperature,
                                             rows=rows))
                new[p].append(th.flatten(0, 1).index_select(0, rows))
        self.queue.push([torch.cat(rows) for rows in new])
        return torch.stack(vals).mean()

    def labels(self, b: dict, s) -> torch.Tensor | None:
        if self.task == "caption":  # the masked tokens' original ids, in the order of the logits
            t = b["caption_targets"]
            return t[t >= 0]
        if self.task == "itm":  # rows: B positives then 2B mined negatives
            n = s.logits.shape[0] // 3
            y = torch.zeros(3 * n, dtype=torch.long, device=s.logits.device)
            y[:n] = 1
            return y
        return b.get("labels")
