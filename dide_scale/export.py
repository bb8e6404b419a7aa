"""Export a trained model as a self-contained artifact, in transformers' conventions:

    OUT/
      config.json               model_type, task, num_classes, tower shape, id2label (head order)
      model.safetensors         fp32 weights consolidated from the sharded checkpoint
      tokenizer files           data.tokenizer's (tokenizer.json, vocab.txt, ...)
      preprocessor_config.json  the image geometry and normalisation (ViltImageProcessor's keys
                                where they can say it, dide_geometry always)
      README.md                 a model card: task, teacher, data, the dev-split score and step
      best.json                 a selected model only: {"step", "accuracy", "split"}

The weights come from a sharded checkpoint, consolidated to fp32 (exact master weights,
whatever the ZeRO stage, precision or world size of the run); the folder loads without
DeepSpeed, the teacher or the run directory (``models.saved.load_pretrained``,
``DualEncoder.from_pretrained``, ``inference.Predictor.from_pretrained``), unpickles
nothing, and can be pushed to the Hugging Face Hub as it is.

    python -m dide_scale.export RUN_DIR [OUT_DIR] [--tag step_00001000] [--best '{"step": .., "accuracy": ..}']

The trainer runs the second form for each new best model on the dev split, in a process of
its own, so that the other ranks never wait in a collective while rank 0 consolidates.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
from pathlib import Path

from .checkpoint import Checkpointer, verify
from .config import config_from_dict
from .console import add_version, quiet_libraries
from .data.transforms import PREPROCESSOR, load_tokenizer, preprocessor_config, read_geometry  # noqa: F401 (read_geometry: its old home)
from .models.saved import save_pretrained

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
    module doc), written atomically (``best.json`` too, for a selected model: the folder and
    its record change together)."""
    def beside(tmp: Path) -> None:
        load_tokenizer(cfg.data.tokenizer).save_pretrained(str(tmp))
        (tmp / PREPROCESSOR).write_text(json.dumps(preprocessor_config(cfg, module), indent=2))
        if best:
            (tmp / "best.json").write_text(json.dumps({**best, "split": cfg.data.val_shards}, indent=2))
    return save_pretrained(module, out_dir, state_dict, card_from_run(cfg, best, step), beside)


def card_from_run(cfg, best: dict | None, step: int | None) -> dict:
    teacher = ""
    if cfg.loss.distills() and cfg.teacher.path:
        kind = {"hf_vilt": "transformers ViLT", "vilt_ckpt": "ViLT checkpoint"}.get(cfg.teacher.kind,
                                                                                   "dide_scale fusion")
        teacher = f"{cfg.teacher.path} ({kind})"
    if best:
        metric = {"itm": "mean R@1 (retrieval)", "caption": "CIDEr-D"}.get(cfg.train.task, "accuracy")
        selected = (f"the dev split `{cfg.data.val_shards}`: {metric} {best['accuracy']:.4f} at step {best['step']} "
                    f"of {cfg.train.max_steps}")
    else:
        selected = f"the last step ({step if step is not None else cfg.train.max_steps} of {cfg.train.max_steps})"
    return {"teacher": teacher, "data": f"`{cfg.data.train_shards}`", "selected": selected}


def main(argv: list[str] | None = None) -> int:
    import argparse

    prog = "dide-export"  # also `python -m dide_scale.export`
    ap = argparse.ArgumentParser(prog=prog, description="Export the newest intact checkpoint of a run directory as "
                                 "a self-contained model folder (config.json, model.safetensors, tokenizer, "
                                 "preprocessor_config.json, model card) that loads without DeepSpeed or the teacher.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (train.output_dir) with checkpoints/ and "
                                                      "config.yaml")
    ap.add_argument("out", metavar="OUT_DIR", nargs="?", help="where to write the folder (default: RUN_DIR/export)")
    ap.add_argument("--tag", default=None, help="the checkpoint to export (default: the newest intact one)")
    ap.add_argument("--best", default=None, help="the dev-split record of a selected model, as JSON (for its card)")
    add_version(ap)
    args = ap.parse_args(argv)
    quiet_libraries()
    run_dir = Path(args.run_dir)
    try:
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir}: not a run directory (no config.yaml)")
        out = export_from_checkpoint(run_dir, args.out or run_dir / "export", tag=args.tag,
                                     best=json.loads(args.best) if args.best else None)
    except (FileNotFoundError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
