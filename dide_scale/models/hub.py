"""The exported-model format, through huggingface_hub's ``PyTorchModelHubMixin``.

A model directory holds ``config.json`` (``model_type``, ``task``, ``num_classes``, the
tower shape, ``id2label`` in the head's order) and ``model.safetensors``, plus what
``dide_scale.export`` adds beside them (tokenizer files, ``preprocessor_config.json``, a
model card).  The mixin gives ``save_pretrained`` / ``from_pretrained`` (a local directory or
a Hub repository id) / ``push_to_hub`` and the model card; the config and the weights are
written and read here because the format predates it, and loading is strict (the mixin's
own loader would ignore missing weights).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin
from safetensors.torch import load_file, save_file

from .blocks import TowerShape

_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"

MODEL_CARD = """---
{{ card_data }}
---

# {{ title }}

A {{ kind }} trained with dide_scale{% if teacher %}, distilled from the fusion teacher
`{{ teacher }}`{% endif %}.

| | |
|---|---|
| task | {{ task }} |
| towers | {{ shape }} |
| training data | {{ data }} |
| selected on | {{ selected }} |

## Use

```python
from PIL import Image
from dide_scale.inference import Predictor

predictor = Predictor.from_pretrained("{{ repo_id }}")
{% if task == "caption" %}predictor.caption([Image.open("photo.jpg")])   # beam=, max_length=, length_penalty= override
```

`Predictor` reads the tokenizer, the image geometry and the decoding defaults (`generation`
in `config.json`) from this folder.
{% else %}predictor.answer([Image.open("photo.jpg")], ["what is on the table?"])
```

`Predictor` reads the tokenizer and the image geometry from this folder; images are
encoded once and cached, so further questions about the same image cost one text pass.
{% endif %}"""


class Exportable(PyTorchModelHubMixin, library_name="dide_scale", tags=["vision-language", "distillation"],
                 model_card_template=MODEL_CARD):
    """Save/load of a project model (``DualEncoder``, ``FusionEncoder``): subclasses define
    ``model_type`` and take ``(shape, task, num_classes, tap_layer)``, and carry ``shape``,
    ``task``, ``num_classes`` and ``labels``; ``training_only`` names state-dict prefixes that
    are not exported (e.g. DistillVLM's projections)."""

    model_type: str = ""
    training_only: tuple[str, ...] = ()

    def export_config(self) -> dict:
        cfg = {"model_type": self.model_type, "task": self.task, "num_classes": self.num_classes,
               "shape": asdict(self.shape)}
        if self.labels:  # the head's output names, in transformers' convention
            cfg["id2label"] = {str(i): name for i, name in enumerate(self.labels)}
        return cfg

    @classmethod
    def from_config(cls, cfg: dict, tap_layer: int = -1):
        """The model an exported ``config.json`` describes (weights not loaded)."""
        model = cls(TowerShape(**cfg["shape"]), cfg["task"], cfg["num_classes"], tap_layer)
        model.labels = names_from_id2label(cfg.get("id2label"))
        return model

    def exported_state(self, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
        sd = self.state_dict() if state_dict is None else state_dict
        return {k: v.detach().contiguous().cpu() for k, v in sd.items() if not k.startswith(self.training_only)}

    def _save_pretrained(self, save_directory: Path) -> None:
        save_file(self.exported_state(), str(Path(save_directory) / WEIGHTS))
        (Path(save_directory) / CONFIG).write_text(json.dumps(self.export_config(), indent=2))

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, config: dict | None = None, map_location: str = "cpu",
                         **_ignored):
        root = Path(model_id) if os.path.isdir(model_id) else Path(_download(model_id, revision, cache_dir, token))
        cfg = config if config is not None else read_config(root)
        if cfg.get("model_type") != cls.model_type:
            raise ValueError(f"{model_id}: config.json has model_type={cfg.get('model_type')!r}, "
                             f"this class loads {cls.model_type!r}")
        model = cls.from_config(cfg)
        load_weights(model, root / WEIGHTS, str(model_id))
        return model.to(map_location).eval()


def _download(repo_id: str, revision, cache_dir, token) -> str:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token)


def read_config(root: str | os.PathLike) -> dict:
    p = Path(root) / CONFIG
    if not p.is_file():
        raise FileNotFoundError(f"{root}: expected a model directory with {CONFIG} and {WEIGHTS}")
    return json.loads(p.read_text())


def names_from_id2label(id2label: dict | None) -> list[str] | None:
    """``{"0": "net", "1": "pitcher", ...}`` (``id2label`` of a config.json, ours or
    transformers') -> names in output order; None when absent or generic (transformers'
    default ``LABEL_0``, ``LABEL_1``, ...: they name no class)."""
    if not id2label:
        return None
    items = sorted((int(k), str(v)) for k, v in id2label.items())
    if [k for k, _ in items] != list(range(len(items))):
        raise ValueError(f"id2label keys are not 0..{len(items) - 1}")
    names = [v for _, v in items]
    return None if all(_GENERIC_LABEL.match(n) for n in names) else names


def load_weights(model, path: Path, where: str, drop_prefix: str | None = None) -> None:
    """Load ``model.safetensors`` strictly (training-only parts and, with ``drop_prefix``, a
    head being replaced may be absent)."""
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no {WEIGHTS}")
    sd = load_file(str(path))
    if drop_prefix:
        sd = {k: v for k, v in sd.items() if not k.startswith(drop_prefix)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed = tuple(model.training_only) + ((drop_prefix,) if drop_prefix else ())
    missing = [k for k in missing if not (allowed and k.startswith(allowed))]
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
