"""Export a trained model as a self-contained artifact, in transformers' conventions:

    OUT/
      config.json               model_type, task, num_classes, tower shape, id2label (head order)
      model.safetensors         fp32 weights consolidated from the sharded checkpoint
      tokenizer files           data.tokenizer's (tokenizer.json, vocab.txt, ...)
      preprocessor_config.json  the image geometry and normalisation (ViltImageProcessor's keys
                                where they can say it, dide_geometry always)
      README.md                 a model card: task, teacher, data, the dev-split score and step

The weights come from a sharded checkpoint, consolidated to fp32 (exact master weights,
whatever the ZeRO stage, precision or world size of the run); the folder loads without
DeepSpeed, the teacher or the run directory (``models.saved.load_pretrained``,
``DualEncoder.from_pretrained``, ``inference.Predictor.from_pretrained``), unpickles
nothing, and can be pushed to the Hugging Face Hub as it is.

    python -m dide_scale.export RUN_DIR [OUT_DIR]
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

from .checkpoint import Checkpointer, verify
from .models.saved import save_pretrained

PREPROCESSOR = "preprocessor_config.json"
file_log = logging.getLogger("dide_scale.file")  # the run's log file only, not the console


@contextlib.contextmanager
def quiet(what: str):
    """DeepSpeed's consolidation prints progress to the console: keep it in the log file."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield
    text = (out.getvalue() + err.getvalue()).strip()
    if text:
        file_log.info("%s:\n%s", what, text)


def export_from_checkpoint(run_dir: str | Path, out_dir: str | Path, module=None, tag: str | None = None,
                           cfg=None, best: dict | None = None) -> Path:
    """Export checkpoint ``tag`` (the trainer passes the one it has just written: its manifest
    came from the writers, and this node's stat() of other nodes' fresh files may be stale on
    NFS), or the newest intact one.  ``cfg`` is the run's config (read from its
    ``config.yaml`` when None); ``best`` the dev-split record when this is a selected model."""
    from .engine import consolidated_state_dict
    ck = Checkpointer(run_dir)
    if tag is None:
        for tag in ck.candidates():
            if verify(ck.dir / tag) is None:
                break
        else:
            raise FileNotFoundError(f"{run_dir}: no intact checkpoint to export")
    with quiet(f"consolidating {tag}"):
        sd = consolidated_state_dict(ck.dir, tag)
    if cfg is None:
        import yaml

        from .config import config_from_dict
        cfg = config_from_dict(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
    if module is None:
        import copy

        from .build import build_student
        bare = copy.deepcopy(cfg)
        bare.student.init = "random"
        module = build_student(bare)
    return write_artifact(module, out_dir, cfg, sd, best, step=int(tag.rsplit("_", 1)[-1]))


def write_artifact(module, out_dir: str | Path, cfg, state_dict: dict | None = None, best: dict | None = None,
                   step: int | None = None) -> Path:
    """``module``'s weights (or ``state_dict``) with everything needed to use them (see the
    module doc), written atomically."""
    def beside(tmp: Path) -> None:
        from .data.transforms import load_tokenizer
        load_tokenizer(cfg.data.tokenizer).save_pretrained(str(tmp))
        (tmp / PREPROCESSOR).write_text(json.dumps(preprocessor_config(cfg, module), indent=2))
    return save_pretrained(module, out_dir, state_dict, card_from_run(cfg, best, step), beside)


def preprocessor_config(cfg, module) -> dict:
    """How images reach the model.  transformers' ViltImageProcessor keys are written when they
    describe the geometry exactly (ViLT's rule with its own cap), so the folder also loads as
    one; ``dide_geometry`` is what ``Predictor`` reads."""
    d, p = cfg.data, cfg.student.arch.patch_size
    norm = getattr(module, "image", module).normalize  # the dual encoder's image tower, or the fusion model
    out = {"dide_geometry": {"resize": d.image_resize, "shorter": d.image_shorter, "longer": d.image_longer,
                             "patch": p},
           "image_mean": norm.mean.tolist(), "image_std": norm.std.tolist(), "jpeg_draft": d.jpeg_draft}
    if d.image_resize == "vilt" and d.image_longer == int(1333 / 800 * d.image_shorter):
        out.update({"image_processor_type": "ViltImageProcessor", "do_resize": True,
                    "size": {"shortest_edge": d.image_shorter}, "size_divisor": p, "resample": 3, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "do_pad": True})
    return out


def read_geometry(model_dir: str | Path):
    """The ``data.transforms.Geometry`` an exported model was trained with."""
    from .data.transforms import Geometry
    f = Path(model_dir) / PREPROCESSOR
    if not f.is_file():
        raise FileNotFoundError(f"{model_dir}: no {PREPROCESSOR} (export it again with this version)")
    g = json.loads(f.read_text())["dide_geometry"]
    return Geometry(g["resize"], int(g["shorter"]), int(g["longer"]), int(g["patch"]))


def card_from_run(cfg, best: dict | None, step: int | None) -> dict:
    teacher = ""
    if cfg.loss.distills() and cfg.teacher.path:
        kind = {"hf_vilt": "transformers ViLT", "vilt_ckpt": "ViLT checkpoint"}.get(cfg.teacher.kind,
                                                                                   "dide_scale fusion")
        teacher = f"{cfg.teacher.path} ({kind})"
    if best:
        metric = "mean R@1 (retrieval)" if cfg.train.task == "itm" else "accuracy"
        selected = (f"the dev split `{cfg.data.val_shards}`: {metric} {best['accuracy']:.4f} at step {best['step']} "
                    f"of {cfg.train.max_steps}")
    else:
        selected = f"the last step ({step if step is not None else cfg.train.max_steps} of {cfg.train.max_steps})"
    return {"teacher": teacher, "data": f"`{cfg.data.train_shards}`", "selected": selected}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    run_dir = Path(argv[0])
    out = export_from_checkpoint(run_dir, argv[1] if len(argv) > 1 else run_dir / "export")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
