"""``dide-finetune``: fine-tune an exported student on VQAv2 / NLVR2 / SNLI-VE with
attention + soft-label distillation from a fine-tuned ViLT teacher.

    dide-finetune --config finetune_vqa [key=value ...]

The same loop as ``dide-pretrain`` (``dide_scale.train.run``); the shipped presets
reproduce the paper's recipe, start from ``student.init=export:DIR`` and select models on
the dev split only.  The LR schedule counts optimizer steps, so it is right under
gradient accumulation.
"""
from __future__ import annotations

import sys

from .train import cli as _train_cli
from .train import command_description
from .train import main as _train_main

DESCRIPTION = command_description(__doc__)


def main(argv: list[str] | None = None) -> int:
    return _train_main(argv, prog="dide-finetune", description=DESCRIPTION)


def cli() -> int:
    return _train_cli("dide-finetune", DESCRIPTION)


if __name__ == "__main__":
    sys.exit(cli())
