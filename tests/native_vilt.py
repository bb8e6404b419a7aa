"""ViLT checkpoints in dandelin/ViLT's own layout, written the way its release wrote them (a
PyTorch Lightning file whose ``hyper_parameters`` is Lightning's ``AttributeDict``), for tests.

``native_state(model)`` inverts transformers' ``convert_vilt_original_to_pytorch.py`` on a
transformers ViLT: its rename table read right to left, query/key/value concatenated back into
the fused ``qkv``.  It is written here from that script, independently of the project's own
mapping (``dide_scale.models.vilt_native.hf_names``), so a test that goes transformers ->
native (here) -> project (there) checks the project's mapping rather than repeating it.
pytorch_lightning is not installed: the file is pickled while a throwaway module of that name
stands in ``sys.modules``, and removed afterwards.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch


def native_state(model, head: str | None = None) -> dict[str, torch.Tensor]:
    """A transformers ViLT (any task class) as ViLTransformerSS's state dict.  ``head`` names
    what transformers' ``classifier`` was: 'vqa' (vqa_classifier) or 'nlvr2' (nlvr2_classifier)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = model.config
    out = {}
    for i in range(cfg.num_hidden_layers):
        hf, vt = f"vilt.encoder.layer.{i}.", f"transformer.blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{vt}attn.qkv.{kind}"] = torch.cat([sd.pop(f"{hf}attention.attention.{n}.{kind}")
                                                    for n in ("query", "key", "value")])
            for theirs, ours in (("layernorm_before", "norm1"), ("attention.output.dense", "attn.proj"),
                                 ("layernorm_after", "norm2"), ("intermediate.dense", "mlp.fc1"),
                                 ("output.dense", "mlp.fc2")):
                out[f"{vt}{ours}.{kind}"] = sd.pop(f"{hf}{theirs}.{kind}")
    renames = {
        "vilt.embeddings.cls_token": "transformer.cls_token",
        "vilt.embeddings.patch_embeddings.projection.weight": "transformer.patch_embed.proj.weight",
        "vilt.embeddings.patch_embeddings.projection.bias": "transformer.patch_embed.proj.bias",
        "vilt.embeddings.position_embeddings": "transformer.pos_embed",
        "vilt.embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
        "vilt.layernorm.weight": "transformer.norm.weight", "vilt.layernorm.bias": "transformer.norm.bias",
        "vilt.pooler.dense.weight": "pooler.dense.weight", "vilt.pooler.dense.bias": "pooler.dense.bias",
    }
    for k, v in sd.items():
        if k in renames:
            out[renames[k]] = v
        elif k.startswith("vilt.embeddings.text_embeddings."):
            out[k[len("vilt.embeddings."):]] = v
        elif k.startswith("classifier."):
            out[f"{head}_classifier.{k[len('classifier.'):]}"] = v
        else:  # rank_output.*, mlm_score.*
            out[k] = v
    return out


def vilt_config(model, **extra) -> dict:
    """ViLT's sacred config for a transformers ViLT's shape (what ``save_hyperparameters`` kept)."""
    c = model.config
    return {"exp_name": "test", "hidden_size": c.hidden_size, "num_layers": c.num_hidden_layers,
            "num_heads": c.num_attention_heads, "mlp_ratio": c.intermediate_size // c.hidden_size,
            "patch_size": c.patch_size, "image_size": c.image_size, "max_text_len": c.max_position_embeddings,
            "vocab_size": c.vocab_size, "tokenizer": "bert-base-uncased", "max_image_len": -1, "drop_rate": 0.1,
            "loss_names": {"itm": 1, "mlm": 1, "mpp": 0, "vqa": 0, "nlvr2": 0, "irtr": 0}, **extra}


@contextlib.contextmanager
def importable(name: str, cls: type):
    """``cls`` importable as ``name`` (e.g. 'pytorch_lightning.utilities.parsing.AttributeDict')
    for pickling, with throwaway parent modules; all of them gone again afterwards."""
    module, _, qual = name.rpartition(".")
    parts = module.split(".")
    names = [".".join(parts[:i + 1]) for i in range(len(parts))]
    saved = {n: sys.modules.get(n) for n in names}
    cls.__module__, cls.__qualname__ = module, qual
    mods = {n: types.ModuleType(n) for n in names}
    setattr(mods[module], qual, cls)
    sys.modules.update(mods)
    try:
        yield cls
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


class AttributeDict(dict):
    """Lightning's ``AttributeDict``: a dict with attribute access."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError as e:
            raise AttributeError(key) from e

    def __setattr__(self, key, val):
        self[key] = val


def lightning_stand_in():
    return importable("pytorch_lightning.utilities.parsing.AttributeDict", AttributeDict)


class ModelCheckpoint:
    """Lightning 1.x keys ``checkpoint['callbacks']`` by the callback's class."""


def write_lightning_ckpt(path, state: dict[str, torch.Tensor], config: dict | None) -> None:
    """A file shaped like ViLT's release (pytorch_lightning 1.1.4): Lightning's top-level keys, the
    callback states keyed by the callback class, ``hyper_parameters`` an ``AttributeDict`` holding
    the sacred config (None: no hyper-parameters at all)."""
    with lightning_stand_in() as AttributeDict, \
            importable("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", ModelCheckpoint):
        ckpt = {"epoch": 9, "global_step": 200000, "pytorch-lightning_version": "1.1.4",
                "state_dict": dict(state),
                "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt",
                                                "monitor": "val/the_metric"}},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}],
                "lr_schedulers": [{"last_epoch": 3, "lr_lambdas": [None]}]}
        if config is not None:
            ckpt["hparams_name"] = "config"
            ckpt["hyper_parameters"] = AttributeDict(config=config)
        torch.save(ckpt, path)
