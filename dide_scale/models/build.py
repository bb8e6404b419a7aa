"""Build the student and the teacher from a RunConfig; save/load exported models.

An exported model is a directory with ``config.json`` and ``model.safetensors``: it loads
without DeepSpeed, without the teacher and without unpickling anything.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .fusion import FusionEncoder
from .hub import WEIGHTS, load_weights
from .images import conv_to_linear
from .student import DualEncoder, TowerShape


# -- export / import -------------------------------------------------------------------------

def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, state_dict: dict | None = None,
                    card: dict | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` + a model card (``card``'s fields), and
    whatever ``extra(tmp_dir)`` adds, atomically via a temp dir rename.  ``state_dict`` (e.g. consolidated from a sharded
    checkpoint) replaces the model's own weights: they are loaded into a fresh CPU copy, so
    ``model`` itself may be a partitioned module inside an engine."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if state_dict is not None:
        fresh = type(model).from_config(model.export_config())
        missing, unexpected = fresh.load_state_dict(
            {k: v for k, v in state_dict.items() if not k.startswith(fresh.training_only)}, strict=False)
        missing = [k for k in missing if not k.startswith(fresh.training_only)]
        if missing or unexpected:
            raise ValueError(f"the weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model = fresh
    model.save_pretrained(tmp, model_card_kwargs=card_fields(model, card))
    if extra is not None:
        extra(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def card_fields(model, card: dict | None) -> dict:
    """What the model card template (``models.hub.MODEL_CARD``) fills in."""
    s = model.shape
    c = {"title": f"dide_scale {'dual-encoder student' if model.model_type == 'dide_dual_encoder' else 'fusion model'}"
                  f" ({model.task})",
         "kind": "dual-encoder vision-language student (two towers, shallow fusion)"
                 if model.model_type == "dide_dual_encoder" else "fusion-encoder vision-language model",
         "task": model.task, "shape": f"{s.depth} blocks x {s.width} wide, {s.heads} heads, patch {s.patch_size}, "
                                      f"{s.max_text_len} text tokens",
         "teacher": "", "data": "-", "selected": "the last step", "repo_id": "path/to/this/folder"}
    c.update(card or {})
    return c


def read_model_config(path: str | os.PathLike, expected: tuple[str, ...]) -> dict:
    """config.json of a model directory, with errors that say what was expected."""
    p = Path(path)
    cfg_file = p / "config.json"
    if not p.is_dir() or not cfg_file.exists():
        raise FileNotFoundError(f"{p}: expected a model directory with config.json and {WEIGHTS} "
                                f"(model_type one of {expected})")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") not in expected:
        raise ValueError(f"{p}: config.json has model_type={cfg.get('model_type')!r}; expected one of {expected}")
    return cfg


MODEL_TYPES = {"dide_dual_encoder": DualEncoder, "dide_fusion": FusionEncoder}


def load_pretrained(path: str | os.PathLike, tap_layer: int = -1, task: str | None = None,
                    num_classes: int | None = None) -> nn.Module:
    """Load an exported DualEncoder or FusionEncoder (a local directory; for a Hub repository
    use the class's ``from_pretrained``).

    ``task``/``num_classes`` re-head the model (e.g. start VQA fine-tuning from a
    pre-trained ITM student): the towers load, the new head starts fresh.
    """
    cfg = read_model_config(path, tuple(MODEL_TYPES))
    cls = MODEL_TYPES[cfg["model_type"]]
    new_task = task or cfg["task"]
    n = num_classes if num_classes is not None else cfg["num_classes"]
    rehead = new_task != cfg["task"] or n != cfg["num_classes"]
    model = cls.from_config({**cfg, "task": new_task, "num_classes": n, **({"id2label": None} if rehead else {})},
                            tap_layer)
    load_weights(model, Path(path) / WEIGHTS, str(path), drop_prefix="head." if rehead else None)
    return model


# -- student initialisation ------------------------------------------------------------------

def _vilt_block_map(src: dict, prefix: str, i: int) -> dict:
    """One transformers ViltLayer -> timm Block names."""
    p = f"{prefix}encoder.layer.{i}."
    a = p + "attention.attention."
    return {
        "norm1.weight": src[p + "layernorm_before.weight"], "norm1.bias": src[p + "layernorm_before.bias"],
        "attn.qkv.weight": torch.cat([src[a + n + ".weight"] for n in ("query", "key", "value")]),
        "attn.qkv.bias": torch.cat([src[a + n + ".bias"] for n in ("query", "key", "value")]),
        "attn.proj.weight": src[p + "attention.output.dense.weight"],
        "attn.proj.bias": src[p + "attention.output.dense.bias"],
        "norm2.weight": src[p + "layernorm_after.weight"], "norm2.bias": src[p + "layernorm_after.bias"],
        "mlp.fc1.weight": src[p + "intermediate.dense.weight"], "mlp.fc1.bias": src[p + "intermediate.dense.bias"],
        "mlp.fc2.weight": src[p + "output.dense.weight"], "mlp.fc2.bias": src[p + "output.dense.bias"],
    }


def resample_table(table: torch.Tensor, grid: tuple[int, int] | list[int]) -> torch.Tensor:
    """A position table [1, H, W, C] resampled to ``grid`` the way the towers interpolate it
    per image (bilinear, corners aligned), so a table keeps its meaning at another size."""
    if tuple(table.shape[1:3]) == tuple(grid):
        return table
    x = F.interpolate(table.permute(0, 3, 1, 2).float(), size=tuple(grid), mode="bilinear", align_corners=True)
    return x.permute(0, 2, 3, 1).to(table.dtype).contiguous()


def _embeds_from_classic(patch_w, patch_b, cls_token, pos_embed, grid: tuple[int, int] | None = None) -> dict:
    """A classic ViT/ViLT image embedding (conv patch weight [C, 3, P, P], [CLS], a
    [1, 1 + H*W, C] position table whose row 0 belongs to [CLS]) -> NaFlexViT's ``embeds``
    names: the conv as the equivalent Linear, the [CLS] position folded into the [CLS] token,
    the table as [1, H, W, C] (square unless ``grid`` says otherwise)."""
    c = pos_embed.shape[-1]
    n = pos_embed.shape[1] - 1
    gh, gw = grid or (int(round(n ** 0.5)),) * 2
    if gh * gw != n:
        raise ValueError(f"a position table of {n} patch positions is not a {gh}x{gw} grid")
    return {"embeds.proj.weight": conv_to_linear(patch_w), "embeds.proj.bias": patch_b,
            "embeds.cls_token": cls_token + pos_embed[:, :1], "embeds.pos_embed": pos_embed[:, 1:].reshape(1, gh, gw, c)}


def _canonical_from_vilt(src: dict, vilt_grid: tuple[int, int]) -> dict:
    """A transformers ViLT state dict (any task class) in the project's fusion naming."""
    prefix = "vilt." if any(k.startswith("vilt.") for k in src) else ""
    e = prefix + "embeddings."
    depth = 1 + max(int(k.split(".")[2 + (prefix != "")]) for k in src if k.startswith(prefix + "encoder.layer."))
    out = {f"text_embeddings.{k[len(e + 'text_embeddings.'):]}": v for k, v in src.items()
           if k.startswith(e + "text_embeddings.") and "position_ids" not in k}
    emb = _embeds_from_classic(src[e + "patch_embeddings.projection.weight"], src[e + "patch_embeddings.projection.bias"],
                               src[e + "cls_token"], src[e + "position_embeddings"], vilt_grid)
    out.update({f"vit.{k}": v for k, v in emb.items()})
    out.update({"token_type.weight": src[e + "token_type_embeddings.weight"],
                "vit.norm.weight": src[prefix + "layernorm.weight"], "vit.norm.bias": src[prefix + "layernorm.bias"]})
    if prefix + "pooler.dense.weight" in src:
        out.update({"pooler.0.weight": src[prefix + "pooler.dense.weight"],
                    "pooler.0.bias": src[prefix + "pooler.dense.bias"]})
    for i in range(depth):
        out.update({f"vit.blocks.{i}.{k}": v for k, v in _vilt_block_map(src, prefix, i).items()})
    return out


def _student_from_fusion_state(fs: dict, student: DualEncoder) -> dict:
    """Fusion-model weights (project naming) -> both student towers and their poolers, as the
    paper does.

    The modality-type embeddings are folded in exactly: ViLT adds type 0 to the text
    embeddings *after* their LayerNorm, so it goes into that LayerNorm's bias; type 1 is added
    to every image token, so it goes into the [CLS] token and the position table (a
    bilinear interpolation of table + v is the interpolated table + v).  A ViLT-initialised
    tower's first block therefore sees what the fusion model's first block saw.
    """
    grid = [s // student.shape.patch_size for s in student.shape.image_size]
    out = {}
    tt = fs["token_type.weight"]
    for k, v in fs.items():
        if k.startswith("text_embeddings."):
            v = v.clone()
            if k.endswith("LayerNorm.bias"):
                v += tt[0]
            out["text." + k.replace("text_embeddings.", "embeddings.", 1)] = v
        elif k.startswith("vit.blocks.") or k in ("vit.norm.weight", "vit.norm.bias"):
            out["image." + k] = v
            out["text." + k[len("vit."):]] = v
        elif k == "vit.embeds.pos_embed":
            out["image.vit.embeds.pos_embed"] = resample_table(v, grid) + tt[1]
        elif k == "vit.embeds.cls_token":
            out["image.vit.embeds.cls_token"] = v + tt[1]
        elif k.startswith("vit.embeds."):
            out["image." + k] = v
        elif k.startswith("pooler."):
            out["image_" + k] = v
            out["text_" + k] = v
    return out


def init_student(student: DualEncoder, spec: str) -> DualEncoder:
    """Apply ``student.init`` ('random', 'vilt:DIR', 'fusion:DIR', 'timm_bert:DIR', 'export:DIR')."""
    if spec == "random":
        return student
    kind, _, path = spec.partition(":")
    if kind == "vilt":
        vcfg = read_model_config(path, ("vilt",))
        src = _read_any_weights(path)
        sd = _student_from_fusion_state(_canonical_from_vilt(src, _vilt_grid(vcfg)), student)
    elif kind == "fusion":
        read_model_config(path, ("dide_fusion",))
        sd = _student_from_fusion_state(load_file(str(Path(path) / WEIGHTS)), student)
    elif kind == "export":
        src = load_pretrained(path, task=student.task, num_classes=student.num_classes)
        sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    elif kind == "timm_bert":
        sd = _student_from_timm_bert(Path(path), student)
    else:
        raise ValueError(f"student.init={spec!r}: expected random, vilt:DIR, fusion:DIR, timm_bert:DIR or export:DIR")
    own = student.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"student.init={spec!r}: weight shapes do not fit student.arch (checkpoint vs student): "
                         f"{wrong[:4]}")
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"student.init={spec!r}: weights not in the student: {unexpected[:5]}")
    towers = [k for k in missing if k.startswith(("image.vit.blocks", "text.blocks"))]
    if towers:
        raise ValueError(f"student.init={spec!r}: tower weights missing: {towers[:5]} "
                         "(is the checkpoint deeper/shallower than student.arch.depth?)")
    return student


def _vilt_grid(vcfg: dict) -> tuple[int, int]:
    """The patch grid of a ViLT config.json's position table (image_size / patch_size)."""
    def pair(v):
        return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))
    (ih, iw), (ph, pw) = pair(vcfg.get("image_size", 384)), pair(vcfg.get("patch_size", 32))
    return ih // ph, iw // pw


def _read_any_weights(path: str) -> dict:
    p = Path(path)
    if (p / WEIGHTS).exists():
        return load_file(str(p / WEIGHTS))
    if (p / "pytorch_model.bin").exists():
        return torch.load(p / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{p}: no {WEIGHTS} or pytorch_model.bin")


def _student_from_timm_bert(root: Path, student: DualEncoder) -> dict:
    """DIR/vit: a timm ViT (``model.safetensors`` with timm names); DIR/bert: a transformers
    BERT (its embeddings and layers map onto the text tower's pre-LN blocks' weights)."""
    vit = load_file(str(root / "vit" / WEIGHTS))
    grid = [s // student.shape.patch_size for s in student.shape.image_size]
    out = {}
    emb = _embeds_from_classic(vit["patch_embed.proj.weight"], vit["patch_embed.proj.bias"], vit["cls_token"],
                               vit["pos_embed"])
    emb["embeds.pos_embed"] = resample_table(emb["embeds.pos_embed"], grid)
    out.update({f"image.vit.{k}": v for k, v in emb.items()})
    for k, v in vit.items():
        if k.startswith(("blocks.", "norm.")):
            out["image.vit." + k] = v
    read_model_config(root / "bert", ("bert",))
    bert = _read_any_weights(str(root / "bert"))
    pre = "bert." if any(k.startswith("bert.") for k in bert) else ""
    for k, v in bert.items():
        if k.startswith(pre + "embeddings.") and "position_ids" not in k:
            name = k[len(pre + "embeddings."):]
            if name.startswith("position_embeddings"):
                v = v[: student.shape.max_text_len]
            out["text.embeddings." + name] = v
    n_layers = len({k.split(".")[len(pre.split(".")) + 1] for k in bert if k.startswith(pre + "encoder.layer.")})
    for i in range(min(n_layers, student.shape.depth)):
        p = f"{pre}encoder.layer.{i}."
        a = p + "attention.self."
        # BERT is post-LN; its LayerNorms go to the pre-LN slots (the closest mapping; fine-tuning adapts)
        out.update({f"text.blocks.{i}.{k}": v for k, v in {
            "norm1.weight": bert[p + "attention.output.LayerNorm.weight"],
            "norm1.bias": bert[p + "attention.output.LayerNorm.bias"],
            "attn.qkv.weight": torch.cat([bert[a + n + ".weight"] for n in ("query", "key", "value")]),
            "attn.qkv.bias": torch.cat([bert[a + n + ".bias"] for n in ("query", "key", "value")]),
            "attn.proj.weight": bert[p + "attention.output.dense.weight"],
            "attn.proj.bias": bert[p + "attention.output.dense.bias"],
            "norm2.weight": bert[p + "output.LayerNorm.weight"], "norm2.bias": bert[p + "output.LayerNorm.bias"],
            "mlp.fc1.weight": bert[p + "intermediate.dense.weight"], "mlp.fc1.bias": bert[p + "intermediate.dense.bias"],
            "mlp.fc2.weight": bert[p + "output.dense.weight"], "mlp.fc2.bias": bert[p + "output.dense.bias"],
        }.items()})
    return out


# -- from a RunConfig -----------------------------------------------------------------------

def build_student(cfg) -> nn.Module:
    """The trained model: the dual encoder, or a fusion model (student.kind=fusion)."""
    from ..labels import student_labels
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
    student.negatives_across_ranks = cfg.loss.itm_negatives == "global"
    student.exchange_factor = cfg.loss.itm_exchange_capacity
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
        from .hf_vilt import HFViltTeacher
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
    from .attention import resolve_layer_map
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
