"""Build the student and the teacher from a RunConfig: the wiring between the config and
``models/`` (the weight adapters are in ``models.weights``, the saved format in
``models.saved``)."""
from __future__ import annotations

from torch import nn

from .labels import student_labels, teacher_labels
from .models.attention import resolve_layer_map
from .models.caption import Generation
from .models.fusion import FusionEncoder
from .models.hf_vilt import HFViltTeacher
from .models.saved import load_pretrained, read_model_config
from .models.sources import resolve_source
from .models.student import DualEncoder, TowerShape
from .models.vilt_native import ViltCheckpoint
from .models.weights import fusion_model, init_fusion, init_student


def build_student(cfg) -> nn.Module:
    """The trained model: the dual encoder, or a fusion model (student.kind=fusion)."""
    shape = TowerShape.from_arch(cfg.student.arch)
    if cfg.student.kind == "fusion":
        model = FusionEncoder(shape, cfg.train.task, cfg.num_classes(), cfg.loss.student_layer)
        model.labels = student_labels(cfg)
        if cfg.train.task == "caption":
            model.generation = generation(cfg)
        if cfg.loss.token_nce > 0:
            n_pairs = len(cfg.loss.layer_map) or shape.depth
            model.add_distill_projections(n_pairs, teacher_width(cfg))
        init_fusion(model, cfg.student.init)
        if cfg.student.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model
    student = DualEncoder(shape, cfg.train.task, cfg.num_classes(), cfg.loss.student_layer, cfg.loss.itc_temperature)
    student.labels = student_labels(cfg)
    init_student(student, cfg.student.init)
    if cfg.student.grad_checkpointing:
        student.set_grad_checkpointing(True)
    return student


def teacher_source(cfg) -> str:
    """teacher.path on this machine (a Hub id resolved to its local snapshot)."""
    return resolve_source(cfg.teacher.path, "teacher.path")


def generation(cfg):
    """The decoding settings of a RunConfig's ``caption`` section."""
    c = cfg.caption
    return Generation(c.beam_size, c.max_length, c.length_penalty)


def build_teacher(cfg) -> nn.Module | None:
    """The frozen teacher (eval, no grad), or None when no distillation loss is on."""
    if not cfg.loss.distills():
        return None
    t, path = cfg.teacher, teacher_source(cfg)
    if t.kind == "hf_vilt":
        import transformers

        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar on the console
        teacher = HFViltTeacher.from_pretrained(path, cfg.train.task, tap_layer=cfg.loss.teacher_layer)
    elif t.kind == "vilt_ckpt":
        teacher = fusion_model(ViltCheckpoint.read(path), cfg.train.task, t.itm_head, t.arch.heads,
                               cfg.loss.teacher_layer, teacher_labels(cfg))
    else:
        read = read_model_config(path, ("dide_fusion",))  # before loading: the clearer error first
        if read["task"] != cfg.train.task:
            raise ValueError(f"teacher.path={t.path}: the teacher was trained for task {read['task']!r} "
                             f"but train.task={cfg.train.task!r}")
        teacher = load_pretrained(path, tap_layer=cfg.loss.teacher_layer)
    check_pairing(teacher, cfg)
    teacher.eval().requires_grad_(False)
    return teacher


def teacher_width(cfg) -> int:
    """Hidden size of the configured teacher (token NCE projects the student's states to it)."""
    return teacher_shape(cfg)[0]


def teacher_shape(cfg) -> tuple[int, int]:
    """(width, attention heads) of the configured teacher, read from its files before it is built."""
    path = teacher_source(cfg)
    if cfg.teacher.kind == "hf_vilt":
        c = read_model_config(path, ("vilt",))
        return int(c["hidden_size"]), int(c["num_attention_heads"])
    if cfg.teacher.kind == "vilt_ckpt":
        shape = ViltCheckpoint.read(path).shape(cfg.teacher.arch.heads)
        return shape.width, shape.heads
    shape = read_model_config(path, ("dide_fusion",))["shape"]
    return int(shape["width"]), int(shape["heads"])


def check_heads(t_heads: int, cfg) -> None:
    """Per-head distillation needs as many teacher heads as student heads."""
    lo = cfg.loss
    if (lo.attn_t2i > 0 or lo.attn_i2t > 0 or lo.attn_mse > 0) and lo.head_map == "per_head" \
            and t_heads != cfg.student.arch.heads:
        raise ValueError(f"teacher has {t_heads} heads, student.arch.heads={cfg.student.arch.heads}: "
                         "set loss.head_map=mean or match the head counts")


def check_pairing(teacher: nn.Module, cfg) -> None:
    """Fail early when the teacher's tokens or attention cannot be mapped onto the student's.

    Visual tokens: every model takes the student's patch grid of each image (a teacher with
    another patch size gets each patch resampled to its own size, see ``DistillObjective``), and
    interpolates its position table to that grid, so only square patches are required."""
    s = cfg.student.arch
    t_heads = teacher.num_heads
    t_patch = teacher.patch_size
    if not isinstance(t_patch, int):
        raise ValueError(f"the teacher has non-square patches {t_patch}: the student's square patches cannot "
                         "line up with them")
    check_heads(t_heads, cfg)
    if cfg.train.task == "caption" and cfg.loss.soft_label > 0 and teacher.shape.vocab_size != s.vocab_size:
        raise ValueError(f"the caption teacher predicts over {teacher.shape.vocab_size} tokens, "
                         f"student.arch.vocab_size={s.vocab_size}: soft targets need one vocabulary")
    if cfg.loss.layerwise():
        try:
            resolve_layer_map(cfg.loss.layer_map, teacher.depth, s.depth)
        except ValueError as e:
            raise ValueError(f"loss.layer_map does not fit the teacher ({teacher.depth} blocks) and the student "
                             f"({s.depth} blocks): {e}") from None
    t_text = getattr(teacher, "max_text_len", None) or teacher.shape.max_text_len
    if s.max_text_len > t_text:
        raise ValueError(f"student.arch.max_text_len={s.max_text_len} but the teacher has {t_text} text positions: "
                         f"set student.arch.max_text_len={t_text} (the teacher must see every token the student sees)")
    # widths may differ: attention maps are compared, and token NCE projects to the teacher's width
