"""Label spaces matched by name, never by index.

A transformers checkpoint orders its outputs its own way (``config.id2label``): ViLT's
VQAv2 head has 3,129 answers in an order unrelated to a frequency-sorted ``answers.json``,
and an SNLI-VE or NLVR2 head may list its classes in any order.  Before a teacher's logits
become soft labels they are reordered into the student's label space by name
(:class:`LabelMap`); student labels the teacher lacks are left out of the soft-label loss
and counted.  Everything here reads only JSON files, so it runs in the preflight, before
any process group or model exists.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data.demo import ANSWERS
from .data.shards import NLVR2_NAMES, SNLI_VE_NAMES
from .models.hub import names_from_id2label
from .models.sources import resolve_source


def student_labels(cfg) -> list[str] | None:
    """The student's label names in its head's order (None for ITM, which has no classes)."""
    task = cfg.train.task
    if task == "vqa":
        return list(answer_list(cfg))
    if task == "snli_ve":
        return list(SNLI_VE_NAMES)
    if task == "nlvr2":
        return list(NLVR2_NAMES)
    return None


def read_label_file(path: str, key: str) -> list[str]:
    """Output names in order from a JSON file: a list, or an id -> name object such as ViLT's
    ``vqa_dict.json`` ({"0": "net", "1": "pitcher", ...})."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{key}={path}: cannot read a JSON list of names or an id -> name object ({e})") from None
    if isinstance(data, dict):
        try:
            names = names_from_id2label(data)
        except ValueError as e:
            raise ValueError(f"{key}={path}: {e}") from None
        if names:
            return names
    if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
        return data
    raise ValueError(f"{key}={path}: expected a JSON list of names or an id -> name object like "
                     '{"0": "net", "1": "pitcher"}')


def answer_list(cfg) -> list[str]:
    """The VQA answer vocabulary of a RunConfig (data.answer_vocab: a JSON list or id -> answer
    object, or a model directory's id2label; the demo's answers by default with the demo's
    tokenizer only), checked against
    data.num_answers."""
    src = cfg.data.answer_vocab
    if src and os.path.isdir(src):
        cfg_file = Path(src) / "config.json"
        names = names_from_id2label(json.loads(cfg_file.read_text()).get("id2label")) if cfg_file.is_file() else None
        if not names:
            raise ValueError(f"data.answer_vocab={src}: a directory without answer names (config.json id2label)")
        answers = names
    elif src:
        answers = read_label_file(src, "data.answer_vocab")  # a list, or an id -> answer object (vqa_dict.json)
    elif cfg.data.tokenizer == "builtin:demo":  # the demo's answers go with the demo's tokenizer only
        answers = list(ANSWERS)
    else:
        raise ValueError(f"train.task=vqa needs data.answer_vocab (a JSON list of answers, an id -> answer object "
                         f"such as ViLT's vqa_dict.json, or a model directory with id2label); only "
                         f"data.tokenizer=builtin:demo has default answers (the demo's), not {cfg.data.tokenizer}")
    if len(answers) != cfg.data.num_answers:
        raise ValueError(f"data.answer_vocab has {len(answers)} answers but data.num_answers="
                         f"{cfg.data.num_answers}")
    return answers


def teacher_labels(cfg) -> list[str] | None:
    """The teacher's output names in its own order, from ``teacher.label_names``,
    ``teacher.label_file``, its config.json (``id2label``) or, for a ViLT checkpoint's NLVR2
    head, ViLT's own (False, True); None for ITM or when nothing names them."""
    if cfg.train.task == "itm":
        return None
    if cfg.teacher.label_names:
        return list(cfg.teacher.label_names)
    if cfg.teacher.label_file:
        return read_label_file(cfg.teacher.label_file, "teacher.label_file")
    if cfg.teacher.kind == "vilt_ckpt":
        return list(NLVR2_NAMES) if cfg.train.task == "nlvr2" else None  # ViLT's label 1 is "the sentence is true"
    raw = json.loads((Path(resolve_source(cfg.teacher.path, "teacher.path")) / "config.json").read_text())
    return names_from_id2label(raw.get("id2label"))


@dataclass
class LabelMap:
    """Teacher logits -> the student's label space: ``index[i]`` is the teacher output of
    student label i, ``present[i]`` whether the teacher has it at all."""

    index: torch.Tensor
    present: torch.Tensor
    missing: list[str]
    teacher_size: int
    # (index, present) per device, copied once: a host-to-device copy in every step stalls the host
    _on: dict = field(default_factory=dict, repr=False, compare=False)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``index`` and ``present`` on ``device``."""
        if device not in self._on:
            self._on[device] = (self.index.to(device), self.present.to(device))
        return self._on[device]

    def apply(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        if teacher_logits.shape[-1] != self.teacher_size:
            raise ValueError(f"the teacher gave {teacher_logits.shape[-1]} logits but its label names count "
                             f"{self.teacher_size}")
        return teacher_logits.index_select(-1, self.on(teacher_logits.device)[0])

    @property
    def identity(self) -> bool:
        return self.teacher_size == len(self.index) and bool(
            torch.equal(self.index, torch.arange(len(self.index))))

    def summary(self) -> str:
        n = len(self.index)
        shown = ", ".join(self.missing[:10]) + (" ..." if len(self.missing) > 10 else "")
        return (f"the teacher covers {n - len(self.missing)} of the student's {n} labels"
                + (f"; {len(self.missing)} left out of the soft-label loss: {shown}" if self.missing else ""))


def match_labels(student: list[str], teacher: list[str] | None, task: str, min_overlap: float = 0.9,
                 where: str = "the teacher") -> LabelMap:
    """Map ``teacher`` names onto ``student`` names.

    VQA: exact names; answers the teacher lacks are marked absent; fewer than
    ``min_overlap`` of the student's answers covered is refused with the numbers.
    SNLI-VE / NLVR2: the same names in any order (compared case-insensitively), else refused
    naming both orders.  A teacher without names is refused (``teacher.label_names`` declares
    them)."""
    if teacher is None:
        raise ValueError(f"{where} has no label names (config.json id2label is missing or LABEL_0, LABEL_1, ...), "
                         "so its outputs cannot be matched to the student's labels by name: set "
                         "teacher.label_file to a JSON file of its output names in order (ViLT's vqa_dict.json for "
                         f"its VQA checkpoint) or teacher.label_names (the student's: {_preview(student)})")
    if task == "vqa":
        pos = {name: i for i, name in enumerate(teacher)}
        index = torch.tensor([pos.get(a, 0) for a in student], dtype=torch.long)
        present = torch.tensor([a in pos for a in student], dtype=torch.bool)
        missing = [a for a in student if a not in pos]
        covered = 1.0 - len(missing) / max(1, len(student))
        if covered < min_overlap:
            raise ValueError(
                f"{where} knows only {len(student) - len(missing)} of the student's {len(student)} answers "
                f"({covered:.1%} < teacher.min_label_overlap={min_overlap}); first missing: {_preview(missing)}. "
                "Write the answer list in the teacher's order with `dide-data vqa --answers-from TEACHER_DIR`")
        return LabelMap(index, present, missing, len(teacher))
    low = [t.lower() for t in teacher]
    if sorted(low) != sorted(s.lower() for s in student) or len(set(low)) != len(low):
        raise ValueError(f"{where} labels its {task} outputs {list(teacher)}, the student {list(student)}: "
                         "the names do not correspond (set teacher.label_names if the checkpoint's names are "
                         "wrong)")
    index = torch.tensor([low.index(s.lower()) for s in student], dtype=torch.long)
    return LabelMap(index, torch.ones(len(student), dtype=torch.bool), [], len(teacher))


def label_map_for(cfg) -> LabelMap | None:
    """The LabelMap of a RunConfig's teacher (None for ITM, for captioning, whose labels are the
    shared tokenizer's ids, or when no soft labels are used)."""
    if cfg.train.task in ("itm", "caption") or not cfg.loss.soft_label > 0:
        return None
    return match_labels(student_labels(cfg), teacher_labels(cfg), cfg.train.task, cfg.teacher.min_label_overlap,
                        f"teacher.path={cfg.teacher.path}")


def _preview(names: list[str], n: int = 8) -> str:
    return ", ".join(map(repr, names[:n])) + (" ..." if len(names) > n else "")
