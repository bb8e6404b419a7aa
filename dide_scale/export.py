"""Export a trained student to ``config.json`` + ``model.safetensors``.

The weights come from the newest intact sharded checkpoint, consolidated to fp32 (exact
master weights, whatever the ZeRO stage, precision or world size of the run), so the
exported model loads with ``dide_scale.models.build.load_pretrained`` alone: no
DeepSpeed, no teacher, no pickle.

    python -m dide_scale.export RUN_DIR [OUT_DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

from .checkpoint import Checkpointer, verify
from .models.build import save_pretrained


def export_from_checkpoint(run_dir: str | Path, out_dir: str | Path, module=None, tag: str | None = None) -> Path:
    """Export checkpoint ``tag`` (the trainer passes the one it has just written: its manifest
    came from the writers, and this node's stat() of other nodes' fresh files may be stale on
    NFS), or the newest intact one."""
    from .engine import consolidated_state_dict
    ck = Checkpointer(run_dir)
    if tag is None:
        for tag in ck.candidates():
            if verify(ck.dir / tag) is None:
                break
        else:
            raise FileNotFoundError(f"{run_dir}: no intact checkpoint to export")
    sd = consolidated_state_dict(ck.dir, tag)
    if module is None:
        import yaml
        from .config import config_from_dict
        from .models.build import build_student
        cfg = config_from_dict(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
        cfg.student.init = "random"
        module = build_student(cfg)
    return save_pretrained(module, out_dir, state_dict=sd)


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
