"""ViLT's own checkpoints (dandelin/ViLT's PyTorch Lightning ``.ckpt`` files) as teachers and inits.

The layout is that of ``ViLTransformerSS`` (``vilt/modules/``): ``text_embeddings.*`` (BERT
embeddings), ``token_type_embeddings`` (2 rows; 3 for NLVR2), ``transformer.*`` (a timm ViT:
``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N`` with a fused ``qkv``, ``norm``),
``pooler.dense`` and the heads: ``itm_score.fc`` (2-way image-text matching, the pre-training
teacher of DiDE), ``mlm_score.*``, ``vqa_classifier.{0,1,3}``, ``nlvr2_classifier.{0,1,3}`` and
``rank_output`` (retrieval).  transformers' conversion script drops ``itm_score`` from the
MLM+ITM checkpoint, so only these files carry the ITM head.

Reading.  The files pickle more than tensors: ``hyper_parameters`` is an object of Lightning's
own class (``AttributeDict``), sometimes holding sacred's read-only containers, and Lightning 1.x
keys its callback states by the callback classes.  They are read with torch's ``weights_only``
unpickler, which rebuilds tensors and plain containers and runs nothing else; the known harmless
containers (:data:`PLAIN_CONTAINERS`) are read as the dict or list they are, the callback classes
(:data:`CLASS_NAMES`) as their names.  Any other global is refused with its name
(pytorch_lightning is never imported).

Mapping.  :func:`hf_names` renames a ViLT state dict to transformers' ViLT names (the mapping of
transformers' ``convert_vilt_original_to_pytorch.py``, heads included); from there
``weights._canonical_from_vilt`` gives the project's fusion names, so a ViLT checkpoint becomes
(``weights.fusion_model``) a :class:`~dide_scale.models.fusion.FusionEncoder` that computes what
ViLT computes (same blocks, LayerNorm eps 1e-6 as ViLT's ViT, BERT's 1e-12 in the text embeddings).

Shapes come from the state dict (width, depth, MLP ratio, patch size, position grid, text
positions, vocabulary, head sizes); the head count, which a fused ``qkv`` does not show, from
``hyper_parameters['config']['num_heads']`` or the caller's fallback.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .blocks import TowerShape

# Harmless containers of Lightning and sacred files, read as the plain dict / list they hold.
PLAIN_CONTAINERS = {
    "pytorch_lightning.utilities.parsing.AttributeDict": dict,
    "lightning_fabric.utilities.data.AttributeDict": dict,
    "lightning.fabric.utilities.data.AttributeDict": dict,
    "sacred.config.custom_containers.ReadOnlyDict": dict,
    "sacred.config.custom_containers.ReadOnlyList": list,
}
HEAD_PREFIXES = {"itm": "itm_score.fc.", "rank": "rank_output.", "vqa": "vqa_classifier.",
                 "nlvr2": "nlvr2_classifier.", "mlm": "mlm_score."}


class UnsafeCheckpoint(ValueError, pickle.UnpicklingError):
    """A checkpoint whose pickle names a global outside the allowed set; nothing was run."""


def _stand_in(kind: type) -> type:
    """A class whose construction yields a plain ``kind``: the unpickler's NEWOBJ (``cls.__new__``)
    and REDUCE (``cls(items)``) both give a dict/list, which it then fills as its own."""
    return type(f"Plain{kind.__name__.title()}", (), {"__new__": lambda cls, *a, **kw: kind(*a, **kw)})


# Classes Lightning 1.x pickles only as names: the callback types that key checkpoint["callbacks"]
# (ViLT's files were written by pytorch_lightning 1.1.4); read as their dotted names, never called.
CLASS_NAMES = tuple(f"pytorch_lightning.callbacks.{m}" for m in (
    "model_checkpoint.ModelCheckpoint", "early_stopping.EarlyStopping", "lr_monitor.LearningRateMonitor",
    "progress.ProgressBar"))
_SAFE = [(_stand_in(kind), name) for name, kind in PLAIN_CONTAINERS.items()] + [(n, n) for n in CLASS_NAMES]
# an AttributeDict pickled by older Pythons carries an empty instance-__dict__ state (BUILD {}):
# the unpickler only builds allowlisted types, and the stand-in made a plain dict
_SAFE.append((dict, "builtins.dict"))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A ``.ckpt`` / ``.pt`` file as plain Python objects, without running its pickle."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such checkpoint file (expected dandelin/ViLT's .ckpt layout)")
    try:
        with torch.serialization.safe_globals(_SAFE):
            try:
                return torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:  # a file of the legacy (pre-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        name = re.search(r"GLOBAL (\S+)", str(e))
        what = f"the global {name.group(1)}" if name else str(e).strip().splitlines()[-1][:200]
        raise UnsafeCheckpoint(
            f"{p}: refused to load: its pickle names {what}, which is neither a tensor, a plain container nor one "
            f"of {sorted(PLAIN_CONTAINERS)}; nothing in it was run. Load it only if you trust it, and save its "
            "state_dict alone (torch.save(ckpt['state_dict'], 'weights.pt'))") from None
    except Exception as e:  # truncated, corrupt, or a pickle that misuses an allowed name
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(f"{p}: cannot be read as a checkpoint ({type(e).__name__}: {reason}); is the file "
                         "complete?") from None


def _config_of(ckpt: dict) -> dict:
    """ViLT's sacred config from ``hyper_parameters`` (``save_hyperparameters()`` of ``config``)."""
    hp = ckpt.get("hyper_parameters") or {}
    cfg = hp.get("config", hp) if isinstance(hp, dict) else {}
    return cfg if isinstance(cfg, dict) else {}


@dataclass
class ViltCheckpoint:
    """A ViLT state dict with its (possibly empty) sacred config."""

    path: str
    state: dict[str, torch.Tensor]
    config: dict = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ViltCheckpoint":
        ckpt = read_checkpoint(path)
        if not isinstance(ckpt, dict):
            raise ValueError(f"{path}: holds a {type(ckpt).__name__}, expected a Lightning checkpoint or a state dict")
        state = ckpt.get("state_dict", ckpt)
        state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if "transformer.cls_token" not in state or "text_embeddings.word_embeddings.weight" not in state:
            some = sorted(state)[:4]
            raise ValueError(f"{path}: not a ViLT checkpoint of dandelin/ViLT's layout (no transformer.cls_token / "
                             f"text_embeddings.*; its first keys: {some}); a transformers ViLT is a directory "
                             "(teacher.kind=hf_vilt, student.init=vilt:DIR)")
        return cls(str(path), state, _config_of(ckpt))

    # -- what the weights say ---------------------------------------------------------------
    @property
    def depth(self) -> int:
        return 1 + max(int(k.split(".")[2]) for k in self.state if k.startswith("transformer.blocks."))

    @property
    def grid(self) -> tuple[int, int]:
        n = self.state["transformer.pos_embed"].shape[1] - 1
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"{self.path}: a position table of {n} patches is not square (ViLT's images are)")
        return side, side

    def heads_present(self) -> list[str]:
        return [h for h, p in HEAD_PREFIXES.items() if any(k.startswith(p) for k in self.state)]

    def shape(self, heads_fallback: int | None = None) -> TowerShape:
        """The tower shape; heads from the hyper-parameters, else ``heads_fallback`` (else
        ViT's 64-wide heads)."""
        s = self.state
        width = s["transformer.cls_token"].shape[-1]
        patch = s["transformer.patch_embed.proj.weight"].shape[-1]
        heads = int(self.config.get("num_heads") or heads_fallback or max(1, width // 64))
        if width % heads:
            raise ValueError(f"{self.path}: width {width} is not divisible by {heads} heads (the checkpoint's "
                             "hyper_parameters do not name num_heads: set teacher.arch.heads)")
        shape = TowerShape(width=width, depth=self.depth, heads=heads,
                           mlp_ratio=s["transformer.blocks.0.mlp.fc1.weight"].shape[0] / width, patch_size=patch,
                           image_size=[g * patch for g in self.grid],
                           max_text_len=s["text_embeddings.position_embeddings.weight"].shape[0],
                           vocab_size=s["text_embeddings.word_embeddings.weight"].shape[0])
        for hp, ours in (("hidden_size", width), ("num_layers", shape.depth), ("patch_size", patch),
                         ("vocab_size", shape.vocab_size), ("max_text_len", shape.max_text_len)):
            if hp in self.config and int(self.config[hp]) != ours:
                raise ValueError(f"{self.path}: hyper_parameters say {hp}={self.config[hp]} but the weights have "
                                 f"{ours}: the file is inconsistent")
        return shape

    def num_outputs(self, head: str) -> int:
        w = {"itm": "itm_score.fc.weight", "rank": "rank_output.weight", "vqa": "vqa_classifier.3.weight",
             "nlvr2": "nlvr2_classifier.3.weight"}[head]
        return self.state[w].shape[0]


def hf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViLT state dict in transformers' ViLT names (``convert_vilt_original_to_pytorch.py``:
    the blocks' fused ``qkv`` split into query / key / value, the VQA / NLVR2 classifiers as
    ``classifier.*``); heads transformers has no class for (``itm_score``, ``mlm_score``) keep
    their names."""
    out = {}
    for k, v in state.items():
        m = re.match(r"transformer\.blocks\.(\d+)\.(.+)$", k)
        if m:
            i, rest = m.groups()
            layer = f"vilt.encoder.layer.{i}."
            if rest.startswith("attn.qkv."):
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                    out[f"{layer}attention.attention.{name}.{kind}"] = part
                continue
            out[layer + _BLOCK[rest]] = v
        elif k in _FIXED:
            out[_FIXED[k]] = v
        elif k.startswith("text_embeddings."):
            out["vilt.embeddings." + k] = v
        elif k.startswith(("vqa_classifier.", "nlvr2_classifier.")):
            out["classifier." + k.split(".", 1)[1]] = v
        else:
            out[k] = v
    return out


_BLOCK = {f"{a}.{b}": f"{c}.{b}" for a, c in (
    ("norm1", "layernorm_before"), ("norm2", "layernorm_after"), ("attn.proj", "attention.output.dense"),
    ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")) for b in ("weight", "bias")}
_FIXED = {
    "transformer.cls_token": "vilt.embeddings.cls_token",
    "transformer.patch_embed.proj.weight": "vilt.embeddings.patch_embeddings.projection.weight",
    "transformer.patch_embed.proj.bias": "vilt.embeddings.patch_embeddings.projection.bias",
    "transformer.pos_embed": "vilt.embeddings.position_embeddings",
    "token_type_embeddings.weight": "vilt.embeddings.token_type_embeddings.weight",
    "transformer.norm.weight": "vilt.layernorm.weight", "transformer.norm.bias": "vilt.layernorm.bias",
    "pooler.dense.weight": "vilt.pooler.dense.weight", "pooler.dense.bias": "vilt.pooler.dense.bias",
}


def task_head(ckpt: ViltCheckpoint, task: str, itm_head: str = "auto") -> tuple[str, dict[str, torch.Tensor]]:
    """(which head, its weights in FusionEncoder's ``head.*`` names) for ``task``.

    ITM: ``itm_score.fc`` (2-way, per-pair soft labels) or ``rank_output`` (a retrieval
    checkpoint's ranking score, listwise soft labels); ``itm_head='auto'`` takes the retrieval
    head when there is one (it is what that checkpoint was fine-tuned for).  VQA and SNLI-VE:
    ``vqa_classifier`` (SNLI-VE: 3 outputs).  NLVR2: ``nlvr2_classifier``."""
    have = ckpt.heads_present()
    if task == "itm":
        if itm_head == "auto":
            itm_head = "rank" if "rank" in have else "itm"
        head = itm_head
    else:
        head = "nlvr2" if task == "nlvr2" else "vqa"
    if head not in have:
        raise ValueError(f"{ckpt.path} has no {HEAD_PREFIXES[head].rstrip('.')} head for train.task={task!r} "
                         f"(its heads: {', '.join(have) or 'none'}); the ITM teacher of pre-training is "
                         "vilt_200k_mlm_itm.ckpt, VQA's vilt_vqa.ckpt, NLVR2's vilt_nlvr2.ckpt")
    prefix = HEAD_PREFIXES[head]
    weights = {"head." + k[len(prefix):]: v for k, v in ckpt.state.items() if k.startswith(prefix)}
    if task == "snli_ve" and ckpt.num_outputs("vqa") != 3:
        raise ValueError(f"train.task='snli_ve' needs a 3-way classifier; {ckpt.path}'s vqa_classifier has "
                         f"{ckpt.num_outputs('vqa')} outputs")
    return head, weights
