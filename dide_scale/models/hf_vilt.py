"""A Hugging Face ``transformers`` ViLT checkpoint directory as the frozen teacher.

:class:`HFViltTeacher` has the call interface of the project's own
:class:`~dide_scale.models.fusion.FusionEncoder`::

    out = teacher(images, input_ids, attention_mask, images2=None, capture=False, layers=())
    out.logits, out.qk, out.states   # a ModelOutput

``images`` is an :class:`~dide_scale.models.images.Images` batch (patch sequences with
pixels in [0, 1], their grid coordinates and validity); the adapter applies the
checkpoint's own image normalisation (``preprocessor_config.json``'s
``image_mean``/``image_std``, else ViLT's 0.5/0.5).  ``out.qk`` holds one :class:`CrossQK`
per image pass (two for NLVR2) when ``capture`` is set, else it is empty; ``out.states``
one :class:`JointStates` per image pass for the blocks in ``layers`` (queries/keys from hooks, block outputs from
``output_hidden_states``), for layer-to-layer distillation into a small fusion student.

Image embedding.  ``ViltEmbeddings.visual_embed`` takes a padded pixel batch, interpolates
its position table to each image's valid grid (bilinear, ``align_corners=True``), and then
shuffles the patches with ``torch.multinomial`` (a random subset when
``config.max_image_length`` is smaller than the patch count).  Attention distillation needs
the teacher's image tokens in the order the student uses, so this adapter embeds the
patch sequence itself: the patch Conv2d applied as the equivalent Linear, the position
table interpolated to each image's grid the same way (sampled at the patch coordinates),
[CLS] first, and hands the result to ``ViltModel`` through ``image_embeds=`` with the
patches' validity as ``pixel_mask``.  Padded patches are masked out of every attention, so
the logits equal transformers' own on the same image (the order of the valid tokens does
not matter to a transformer without positions in its blocks).  ``config.max_image_length``
is ignored (fine-tuned ViLT checkpoints use -1 = all patches anyway).

Task heads (``task``):

- ``'vqa'``: ``ViltForQuestionAnswering``; logits [B, num_labels] (VQA scores, sigmoid).
- ``'snli_ve'``: ``ViltForQuestionAnswering`` whose config has exactly 3 labels (ViLT's
  SNLI-VE head has the VQA head's shape); logits [B, 3].
- ``'nlvr2'``: ``ViltForImagesAndTextClassification`` with ``num_images=2``; the text runs
  once with each image (image token type 1 and 2, as transformers does); logits [B, 2].
- ``'itm'``: ``ViltForImageAndTextRetrieval``.  Its ``rank_output`` gives one ranking score
  per pair, trained with a softmax over each query's candidates, so a constant shift means
  nothing and it is no per-pair probability.  The adapter returns it as logits [B, 1] and
  sets ``itm_form = 'rank'``: the ITM soft-label loss then compares distributions over each
  anchor's candidates (``losses.itm_listwise_kl``).  A checkpoint without that head (a plain
  ``ViltModel`` or ``ViltForMaskedLM``) is refused rather than given a random head.

Label names: ``id2label`` holds the names of the classifier's outputs in its own order
(read by ``dide_scale.labels``, which reorders the teacher's logits into the student's
label space by name).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import joint_outputs, resolve_layer, run_tapped
from .fusion import joint_passes
from .images import VILT_MEAN, VILT_STD, Images, Normalize, conv_to_linear, sample_positions
from .output import ModelOutput

TASK_CLASSES = {
    "itm": "ViltForImageAndTextRetrieval",
    "vqa": "ViltForQuestionAnswering",
    "nlvr2": "ViltForImagesAndTextClassification",
    "snli_ve": "ViltForQuestionAnswering",
}
_EXPECTED = "a transformers ViLT checkpoint directory (config.json + weights, as written by save_pretrained)"


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); expected {_EXPECTED}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object; expected {_EXPECTED}")
    return data


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


class _QKCapture:
    """Forward hooks on one block's ``query`` and ``key`` Linears; keep their outputs only
    while ``enabled``."""

    def __init__(self, query: nn.Linear, key: nn.Linear, num_heads: int):
        self.num_heads = num_heads
        self.enabled = False
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        query.register_forward_hook(self._hook_q)
        key.register_forward_hook(self._hook_k)

    def _hook_q(self, module, inputs, output):
        if self.enabled:
            self.q = output

    def _hook_k(self, module, inputs, output):
        if self.enabled:
            self.k = output

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)  # [B, H, N, D]

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, self.q, self.k = self.q, self.k, None, None
        if q is None or k is None:
            raise RuntimeError("HFViltTeacher: no query/key captured (forward without capture?)")
        return self._heads(q), self._heads(k)


class HFViltTeacher(nn.Module):
    """Frozen transformers ViLT model with a task head, called like ``FusionEncoder``.

    Build it with :meth:`from_pretrained`.  Attributes: ``task``, ``num_classes``,
    ``num_heads``, ``width``, ``depth``, ``patch_size``, ``vocab_size``, ``max_text_len``,
    ``image_size`` (the checkpoint's pre-training resolution; any multiple of the patch size
    is accepted), ``tap_layer`` (resolved, 0-based) and ``model`` (the transformers model).
    """

    def __init__(self, model: nn.Module, task: str, tap_layer: int = -1,
                 mean=VILT_MEAN, std=VILT_STD):
        super().__init__()
        if task not in TASK_CLASSES:
            raise ValueError(f"task={task!r} must be one of {sorted(TASK_CLASSES)}")
        cfg = model.config
        self.model = model
        self.task = task
        self.normalize = Normalize(tuple(mean), tuple(std))
        self.num_heads = int(cfg.num_attention_heads)
        self.width = int(cfg.hidden_size)
        self.depth = int(cfg.num_hidden_layers)
        self.mlp_ratio = int(cfg.intermediate_size) / self.width
        patch = _pair(cfg.patch_size)
        self.patch_size = patch[0] if patch[0] == patch[1] else patch
        self.image_size = list(_pair(cfg.image_size))
        self.vocab_size = int(cfg.vocab_size)
        self.max_text_len = int(cfg.max_position_embeddings)
        self.num_classes = 1 if task == "itm" else int(cfg.num_labels)
        self.itm_form = "rank" if task == "itm" else None
        self.id2label = None if task == "itm" else {int(k): str(v) for k, v in cfg.id2label.items()}
        self.tap_layer = resolve_layer(tap_layer, self.depth, "loss.teacher_layer")
        self._taps = [_QKCapture(layer.attention.attention.query, layer.attention.attention.key, self.num_heads)
                      for layer in self.vilt.encoder.layer]  # idle unless enabled

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, task: str, tap_layer: int = -1,
                        **hf_kwargs) -> "HFViltTeacher":
        """Load ``path`` (a transformers ViLT checkpoint directory) for ``task``
        ('itm', 'vqa', 'nlvr2', 'snli_ve').  ``hf_kwargs`` go to transformers'
        ``from_pretrained`` (e.g. ``dtype=``).  The result is in eval mode and frozen."""
        if task not in TASK_CLASSES:
            raise ValueError(f"task={task!r} must be one of {sorted(TASK_CLASSES)}")
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"teacher checkpoint directory {str(root)!r} does not exist; "
                                    f"expected {_EXPECTED}")
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{str(root)!r} has no config.json; expected {_EXPECTED}")
        raw = _read_json(cfg_path)
        model_type = raw.get("model_type")
        if model_type != "vilt":
            raise ValueError(f"{str(cfg_path)!r} has model_type={model_type!r}, but a ViLT checkpoint "
                             f"(model_type 'vilt') was expected: {_EXPECTED}")
        want = TASK_CLASSES[task]
        archs = raw.get("architectures") or []
        if archs and want not in archs:
            raise ValueError(
                f"{str(root)!r} holds a {', '.join(archs)} checkpoint, but task={task!r} needs {want} "
                f"(its task head)" + (": a plain ViltModel/ViltForMaskedLM has no ITM head"
                                      if task == "itm" else ""))
        import transformers
        config = transformers.ViltConfig.from_pretrained(str(root))
        if task == "snli_ve" and config.num_labels != 3:
            raise ValueError(f"task='snli_ve' needs a ViltForQuestionAnswering checkpoint with 3 labels "
                             f"(entailment/neutral/contradiction); {str(root)!r} has {config.num_labels}")
        if task == "nlvr2":
            if config.num_images != 2:
                raise ValueError(f"task='nlvr2' needs config.num_images=2; {str(root)!r} has {config.num_images}")
            if config.modality_type_vocab_size < 3:
                raise ValueError(f"task='nlvr2' needs modality_type_vocab_size >= 3 (token type 2 marks the "
                                 f"second image); {str(root)!r} has {config.modality_type_vocab_size}")
        model_cls = getattr(transformers, want)
        model, info = model_cls.from_pretrained(str(root), output_loading_info=True, **hf_kwargs)
        missing = sorted(info.get("missing_keys") or [])
        mismatched = list(info.get("mismatched_keys") or [])
        if missing or mismatched:
            raise ValueError(
                f"{str(root)!r} does not hold every weight of {want} (task={task!r}); these would be "
                f"randomly initialised: {(missing + [str(m) for m in mismatched])[:8]}"
                + (" (a plain ViltModel has no ITM head)" if task == "itm" else ""))

        mean, std = VILT_MEAN, VILT_STD
        pre = root / "preprocessor_config.json"
        if pre.is_file():
            pcfg = _read_json(pre)
            mean = tuple(_three(pcfg.get("image_mean", mean), "image_mean", pre))
            std = tuple(_three(pcfg.get("image_std", std), "image_std", pre))
        teacher = cls(model, task, tap_layer, mean, std)
        teacher.eval()
        teacher.requires_grad_(False)
        return teacher

    @property
    def vilt(self) -> nn.Module:
        """The underlying ``ViltModel`` (embeddings, encoder, final LayerNorm, pooler)."""
        return self.model.vilt

    # -- forward -------------------------------------------------------------------------
    def embed_image(self, images: Images) -> torch.Tensor:
        """[CLS] + the patch sequence with interpolated position embeddings [B, 1+N, C]:
        ``visual_embed`` without its padding canvas and random patch order; the modality-type
        embedding is added later by ``ViltEmbeddings.forward``."""
        emb = self.vilt.embeddings
        pe = emb.patch_embeddings
        if images.patch_size != pe.patch_size[0] or pe.patch_size[0] != pe.patch_size[1]:
            raise ValueError(f"patches of {images.patch_size} px but the teacher's patch size is "
                             f"{tuple(pe.patch_size)}; resample them first (models.images.resample_patches)")
        proj = pe.projection
        x = F.linear(self.normalize(images.patches), conv_to_linear(proj.weight), proj.bias)  # [B, N, C]
        table = emb.position_embeddings
        c = table.shape[-1]
        grid = (pe.image_size[0] // pe.patch_size[0], pe.image_size[1] // pe.patch_size[1])
        spatial = table[:, 1:, :].transpose(1, 2).reshape(1, c, grid[0], grid[1])
        x = x + sample_positions(spatial, images.coord).to(x.dtype)
        cls_tok = (emb.cls_token + table[:, :1, :]).expand(x.shape[0], -1, -1)
        return emb.dropout(torch.cat([cls_tok.to(x.dtype), x], dim=1))

    def joint(self, images: Images, input_ids, attention_mask, type_id: int = 1, capture: bool = False,
              layers: tuple[int, ...] = ()):
        """(pooled output, CrossQK or None, JointStates or None) of one (text, image) pass."""
        nt = input_ids.shape[1]
        if nt > self.max_text_len:
            raise ValueError(f"text has {nt} tokens but the ViLT teacher has only {self.max_text_len} "
                             f"text positions (max_position_embeddings); truncate to {self.max_text_len}")
        image = self.embed_image(images)
        image_mask = images.token_mask()
        pixel_mask = image_mask.long()[:, None, :]  # with image_embeds, ViLT reads pixel_mask.flatten(1)
        out, qks = run_tapped(self._taps, set(layers) | ({self.tap_layer} if capture else set()), lambda: self.vilt(
            input_ids=input_ids, attention_mask=attention_mask.long(), image_embeds=image, pixel_mask=pixel_mask,
            image_token_type_idx=type_id, return_dict=True, output_hidden_states=bool(layers)))
        mask = torch.cat([attention_mask.bool(), image_mask], dim=1)
        hidden = [out.hidden_states[i + 1] for i in layers]  # [0] is the embeddings
        return (out.pooler_output,
                *joint_outputs(qks, self.tap_layer if capture else None, attention_mask, layers, hidden, mask,
                               image_mask))

    def forward(self, images: Images, input_ids, attention_mask, images2: Images | None = None,
                capture: bool = False, layers: tuple[int, ...] = ()) -> ModelOutput:
        pooled, out = joint_passes(self.joint, images, input_ids, attention_mask, images2, capture, layers,
                                   self.task == "nlvr2")
        if self.task == "itm":
            out.logits = self.model.rank_output(pooled)  # [B, 1]: a ranking score (see the module doc)
        else:  # VQA / SNLI-VE head, or NLVR2's over the two concatenated pooled states
            out.logits = self.model.classifier(pooled)
        return out


def preprocessing_differences(path: str | os.PathLike, data) -> list[str]:
    """How a checkpoint's ``preprocessor_config.json`` (transformers' ViltImageProcessor) sizes
    images differently from the run's ``data.image_*`` settings; empty when they agree or the
    checkpoint ships none.  The teacher still runs (a student may be distilled at another
    resolution), but it then sees images unlike those it was trained on."""
    pre = Path(path) / "preprocessor_config.json"
    if not pre.is_file():
        return []
    p = _read_json(pre)
    out = []
    size = p.get("size", 384)
    shorter = int(size.get("shortest_edge", 384) if isinstance(size, dict) else size)
    longer = int(1333 / 800 * shorter)  # the processor's own rule
    if data.image_resize != "vilt":
        out.append(f"data.image_resize={data.image_resize!r}, the processor keeps the aspect ratio ('vilt')")
    if (data.image_shorter, data.image_longer) != (shorter, longer):
        out.append(f"data.image_shorter/image_longer = {data.image_shorter}/{data.image_longer}, the processor's "
                   f"{shorter}/{longer} (shortest_edge={shorter})")
    if int(p.get("resample", 3)) != 3:
        out.append(f"the processor resamples with PIL mode {p.get('resample')}, the data path with bicubic (3)")
    if data.jpeg_draft:
        out.append("data.jpeg_draft=true decodes JPEGs at a reduced scale; the processor decodes them in full")
    return out


def _three(v, name: str, path: Path) -> list[float]:
    vals = [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]
    if len(vals) != 3:
        raise ValueError(f"{path}: {name} must have 3 values (RGB), got {v!r}")
    return vals
