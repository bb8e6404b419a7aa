"""Weights from elsewhere mapped onto the student: a ViLT (a transformers directory or
dandelin/ViLT's own checkpoint file; both towers from its one encoder, as the paper does, or a
fusion student's whole body), an exported project fusion model, or a timm ViT + a transformers
BERT.  Name maps and the few exact folds (modality-type embeddings, position tables) live here;
building models from a config is ``dide_scale.build``'s job."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .fusion import FusionEncoder
from .hub import WEIGHTS
from .images import conv_to_linear
from .saved import load_pretrained, read_model_config
from .sources import split_init
from .student import DualEncoder
from .vilt_native import ViltCheckpoint, hf_names, task_head


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
            "embeds.cls_token": cls_token + pos_embed[:, :1],
            "embeds.pos_embed": pos_embed[:, 1:].reshape(1, gh, gw, c)}


def _canonical_from_vilt(src: dict, vilt_grid: tuple[int, int]) -> dict:
    """A transformers ViLT state dict (any task class) in the project's fusion naming."""
    prefix = "vilt." if any(k.startswith("vilt.") for k in src) else ""
    e = prefix + "embeddings."
    depth = 1 + max(int(k.split(".")[2 + (prefix != "")]) for k in src if k.startswith(prefix + "encoder.layer."))
    out = {f"text_embeddings.{k[len(e + 'text_embeddings.'):]}": v for k, v in src.items()
           if k.startswith(e + "text_embeddings.") and "position_ids" not in k}
    proj = e + "patch_embeddings.projection."
    emb = _embeds_from_classic(src[proj + "weight"], src[proj + "bias"],
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


def vilt_weights(path: str, mlm_head: bool = False) -> dict:
    """A ViLT's weights in the project's fusion naming: ``path`` is a transformers ViLT directory
    or a checkpoint file of dandelin/ViLT's own layout (``models.vilt_native``).  ``mlm_head``:
    also a captioner's head from the checkpoint's MLM head, when it has one."""
    if Path(path).is_file():
        ck = ViltCheckpoint.read(path)
        src, grid = hf_names(ck.state), ck.grid
    else:
        src, grid = _read_any_weights(path), _vilt_grid(read_model_config(path, ("vilt",)))
    sd = _canonical_from_vilt(src, grid)
    if mlm_head and "mlm_score.transform.dense.weight" in src:
        sd.update(_caption_head_from_mlm(src, sd["text_embeddings.word_embeddings.weight"]))
    return sd


def _caption_head_from_mlm(src: dict, word_embeddings: torch.Tensor) -> dict:
    """ViLT's ``mlm_score`` (transformers' ViltForMaskedLM or dandelin/ViLT's MLMHead) as a
    ``CaptionHead``; its decoder is tied to the word embeddings where the file omits it, its
    bias is ``decoder.bias`` (transformers) or ``bias`` (dandelin/ViLT)."""
    m = "mlm_score."
    return {"head.transform.0.weight": src[m + "transform.dense.weight"],
            "head.transform.0.bias": src[m + "transform.dense.bias"],
            "head.transform.2.weight": src[m + "transform.LayerNorm.weight"],
            "head.transform.2.bias": src[m + "transform.LayerNorm.bias"],
            "head.decoder.weight": src.get(m + "decoder.weight", word_embeddings),
            "head.decoder.bias": src.get(m + "decoder.bias", src.get(m + "bias"))}


def three_token_types(table: torch.Tensor) -> torch.Tensor:
    """A modality-type table with a row for NLVR2's second image: ViLT's own rule when it adds
    the NLVR2 head (row 2 starts as a copy of the image row)."""
    return table if table.shape[0] >= 3 else torch.cat([table[:2], table[1:2]])


def fusion_model(ckpt: ViltCheckpoint, task: str, itm_head: str = "auto", heads_fallback: int | None = None,
                 tap_layer: int = -1, labels: list[str] | None = None):
    """The :class:`FusionEncoder` a ViLT checkpoint describes, with its ``task`` head, in eval mode.
    A retrieval (``rank_output``) head gives one score per pair: ``num_classes`` 1, ``itm_form``
    'rank'.  ``labels`` name the head's outputs in order (checked against its size)."""
    head, head_sd = task_head(ckpt, task, itm_head)
    n = ckpt.num_outputs(head)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{ckpt.path}: its {task} head has {n} outputs but {len(labels)} label names were given "
                         "(teacher.label_file / teacher.label_names)")
    model = FusionEncoder(ckpt.shape(heads_fallback), task, n, tap_layer)
    model.labels = labels
    sd = _canonical_from_vilt(hf_names(ckpt.state), ckpt.grid)
    sd["token_type.weight"] = three_token_types(sd["token_type.weight"])
    missing, unexpected = model.load_state_dict({**sd, **head_sd}, strict=False)
    if missing or unexpected:
        raise ValueError(f"{ckpt.path}: the weights do not fill a fusion model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model.eval()


def init_student(student: DualEncoder, spec: str) -> DualEncoder:
    """Apply ``student.init`` ('random', 'vilt:PATH', 'fusion:DIR', 'timm_bert:DIR', 'export:DIR'); a
    path may be a Hugging Face Hub id (``models.sources``)."""
    if spec == "random":
        return student
    kind, path = split_init(spec)
    if kind == "vilt":
        sd = _student_from_fusion_state(vilt_weights(path), student)
    elif kind == "fusion":
        read_model_config(path, ("dide_fusion",))
        sd = _student_from_fusion_state(load_file(str(Path(path) / WEIGHTS)), student)
    elif kind == "export":
        src = load_pretrained(path, task=student.task, num_classes=student.num_classes)
        sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    elif kind == "timm_bert":
        sd = _student_from_timm_bert(Path(path), student)
    else:
        raise ValueError(f"student.init={spec!r}: expected random, vilt:PATH, fusion:DIR, timm_bert:DIR or export:DIR")
    _check_shapes(student, sd, spec)
    missing, unexpected = student.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"student.init={spec!r}: weights not in the student: {unexpected[:5]}")
    towers = [k for k in missing if k.startswith(("image.vit.blocks", "text.blocks"))]
    if towers:
        raise ValueError(f"student.init={spec!r}: tower weights missing: {towers[:5]} "
                         "(is the checkpoint deeper/shallower than student.arch.depth?)")
    return student


def init_fusion(model: FusionEncoder, spec: str) -> FusionEncoder:
    """``student.init`` of a fusion student: 'random', 'export:DIR' (an exported fusion model; a
    new head when the task or label count differs) or 'vilt:PATH' (a ViLT: transformers directory,
    dandelin/ViLT checkpoint file or Hub id; embeddings, blocks and pooler, the head starts fresh
    as in ViLT's fine-tuning, the position table resampled to student.arch.image_size; a
    captioner's head from the MLM head when the checkpoint has one)."""
    if spec == "random":
        return model
    kind, path = split_init(spec)
    if kind == "export":
        sd = load_pretrained(path, task=model.task, num_classes=model.num_classes).state_dict()
    elif kind == "vilt":
        sd = vilt_weights(path, mlm_head=model.task == "caption")
        if model.pooler is None:  # a captioner reads every text slot, not a pooled [CLS]
            sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
        sd["token_type.weight"] = three_token_types(sd["token_type.weight"])
        grid = [s // model.shape.patch_size for s in model.shape.image_size]
        sd["vit.embeds.pos_embed"] = resample_table(sd["vit.embeds.pos_embed"], grid)
    else:
        raise ValueError(f"student.init={spec!r}: a fusion student takes random, export:DIR or vilt:PATH")
    _check_shapes(model, sd, spec)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    fresh = model.training_only + (("head.",) if kind == "vilt" else ())
    missing = [k for k in missing if not k.startswith(fresh)]
    if missing or unexpected:
        raise ValueError(f"student.init={spec!r}: weights do not match student.arch: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return model


def _check_shapes(model, sd: dict, spec: str) -> None:
    own = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"student.init={spec!r}: weight shapes do not fit student.arch (checkpoint vs student): "
                         f"{wrong[:4]}")


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
            "mlp.fc1.weight": bert[p + "intermediate.dense.weight"],
            "mlp.fc1.bias": bert[p + "intermediate.dense.bias"],
            "mlp.fc2.weight": bert[p + "output.dense.weight"], "mlp.fc2.bias": bert[p + "output.dense.bias"],
        }.items()})
    return out
