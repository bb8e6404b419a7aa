"""Exported models on disk: write one (atomically, with a model card) and load it back
(strictly; optionally with a new head), whatever its class.  The format itself is
``models.hub``'s."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from torch import nn

from .fusion import FusionEncoder
from .hub import WEIGHTS, load_weights
from .student import DualEncoder


def save_pretrained(model: nn.Module, out_dir: str | os.PathLike, state_dict: dict | None = None,
                    card: dict | None = None, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` + a model card (``card``'s fields), and
    whatever ``extra(tmp_dir)`` adds, atomically via a temp dir rename.  ``state_dict`` (e.g.
    consolidated from a sharded checkpoint) replaces the model's own weights: they are loaded into a fresh CPU copy, so
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
