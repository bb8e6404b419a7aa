"""Build the student and the teacher from a RunConfig: the wiring between the config and
``models/`` (the weight adapters are in ``models.weights``, the saved format in
``models.saved``)."""
from __future__ import annotations

from torch import nn

from .labels import student_labels
from .models.fusion import FusionEncoder
from .models.saved import load_pretrained, read_model_config
from .models.student import DualEncoder, TowerShape
from .models.weights import init_student


def build_student(cfg) -> nn.Module:
    """The trained model: the dual encoder, or a fusion model (student.kind=fusion)."""
    shape = TowerShape.from_arch(cfg.student.arch)
    if cfg.student.kind == "fusion":
        model = FusionEncoder(shape, cfg.train.task, cfg.num_classes(), cfg.loss.student_layer)
        model.labels = student_labels(cfg)
        if cfg.loss.token_nce > 0:
            n_pairs = len(cfg.loss.layer_map) or shape.depth
            model.add_distill_projections(n_pairs, teacher_width(cfg))
        if cfg.student.init.startswith("export:"):
            src = load_pretrained(cfg.student.init[7:], task=cfg.train.task, num_classes=cfg.num_classes())
            missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
            missing = [k for k in missing if not k.startswith(model.training_only)]
            if missing or unexpected:
                raise ValueError(f"student.init={cfg.student.init!r}: weights do not match student.arch: "
                                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        elif cfg.student.init != "random":
            raise ValueError(f"student.init={cfg.student.init!r}: a fusion student takes random or export:DIR")
        if cfg.student.grad_checkpointing:
            model.set_grad_checkpointing(True)
        return model
    student = DualEncoder(shape, cfg.train.task, cfg.num_classes(), cfg.loss.student_layer, cfg.loss.itc_temperature)
    student.labels = student_labels(cfg)
    init_student(student, cfg.student.init)
    if cfg.student.grad_checkpointing:
        student.set_grad_checkpointing(True)
    return student


def build_teacher(cfg) -> nn.Module | None:
    """The frozen teacher (eval, no grad), or None when no distillation loss is on."""
    if not cfg.loss.distills():
        return None
    t = cfg.teacher
    if t.kind == "hf_vilt":
        import transformers

        from .models.hf_vilt import HFViltTeacher
        transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar on the console
        teacher = HFViltTeacher.from_pretrained(t.path, cfg.train.task, tap_layer=cfg.loss.teacher_layer)
    else:
        read = read_model_config(t.path, ("dide_fusion",))  # before loading: the clearer error first
        if read["task"] != cfg.train.task:
            raise ValueError(f"teacher.path={t.path}: the teacher was trained for task {read['task']!r} "
                             f"but train.task={cfg.train.task!r}")
        teacher = load_pretrained(t.path, tap_layer=cfg.loss.teacher_layer)
    check_pairing(teacher, cfg)
    teacher.eval().requires_grad_(False)
    return teacher


def teacher_width(cfg) -> int:
    """Hidden size of the configured teacher, read from its config.json (token NCE projects
    the student's states to it)."""
    if cfg.teacher.kind == "hf_vilt":
        return int(read_model_config(cfg.teacher.path, ("vilt",))["hidden_size"])
    return int(read_model_config(cfg.teacher.path, ("dide_fusion",))["shape"]["width"])


def check_pairing(teacher: nn.Module, cfg) -> None:
    """Fail early when the teacher's tokens or attention cannot be mapped onto the student's.

    Visual tokens: every model takes the student's patch grid of each image (a teacher with
    another patch size gets each patch resampled to its own size, see ``DistillTask``), and
    interpolates its position table to that grid, so only square patches are required."""
    from .models.attention import resolve_layer_map
    s = cfg.student.arch
    t_heads = teacher.num_heads
    t_patch = teacher.patch_size
    if not isinstance(t_patch, int):
        raise ValueError(f"the teacher has non-square patches {t_patch}: the student's square patches cannot "
                         "line up with them")
    if cfg.loss.attn_t2i > 0 or cfg.loss.attn_i2t > 0 or cfg.loss.attn_mse > 0:
        if cfg.loss.head_map == "per_head" and t_heads != s.heads:
            raise ValueError(f"teacher has {t_heads} heads, student.arch.heads={s.heads}: "
                             "set loss.head_map=mean or match the head counts")
    if cfg.loss.layerwise():
        try:
            resolve_layer_map(cfg.loss.layer_map, teacher.depth, s.depth)
        except ValueError as e:
            raise ValueError(f"loss.layer_map does not fit the teacher ({teacher.depth} blocks) and the student "
                             f"({s.depth} blocks): {e}") from None
    # widths may differ: attention maps are compared, and token NCE projects to the teacher's width
