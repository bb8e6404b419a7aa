"""docs/REPRODUCE.md kept true without running it: its commands name shipped presets that load,
and its table of projected hours is what tools/project_hours.py computes (the FLOP counter, a
fusion student counted over its joint sequence)."""
from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest

from dide_scale.config import load_config
from dide_scale.metrics import model_flops_per_sample, tower_flops

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import project_hours  # noqa: E402


def test_every_training_command_names_a_shipped_preset_that_loads():
    from test_reproduce import recipe
    presets = [shlex.split(c)[shlex.split(c).index(next(a for a in shlex.split(c) if a.endswith(".sbatch"))) + 1]
               for lang, c in recipe() if lang == "bash" and c.startswith("sbatch")]
    assert presets == ["finetune_snli_ve_teacher", "pretrain_b32", "finetune_vqa", "finetune_nlvr2",
                       "finetune_snli_ve"]
    assert [s[1] for s in project_hours.STEPS] == presets
    for name in presets:
        load_config(name)
    teacher = load_config("finetune_snli_ve")
    assert teacher.teacher.path == load_config("finetune_snli_ve_teacher").train.output_dir + "/best"


@pytest.mark.parametrize("gpus,column", [(64, 2), (8, 3)])
def test_the_documented_hours_are_the_tools(gpus, column):
    rows = {r["preset"]: r["hours"] for r in project_hours.project(gpus, 312.0, 0.4)}
    table = re.findall(r"^\| \d\. [^|]+\| `(\w+)` \| ([\d.]+) h \| ([\d.]+) h \|$", (REPO / "docs" / "REPRODUCE.md")
                       .read_text(), flags=re.M)
    assert len(table) == len(rows)
    for preset, *hours in table:
        documented = float(hours[column - 2])
        assert documented == pytest.approx(rows[preset], abs=0.051 if rows[preset] > 1 else 0.0051), preset


def test_a_fusion_student_is_counted_over_its_joint_sequence():
    dual = load_config("finetune_snli_ve")
    fusion = load_config("finetune_snli_ve_teacher")
    a = fusion.student.arch
    n_img = 1 + 12 * 19
    joint = tower_flops(n_img + a.max_text_len, a.width, a.depth, a.mlp_ratio) + 2 * (n_img - 1) * 3 * 32 ** 2 * 768
    assert model_flops_per_sample(fusion)["student"] == pytest.approx(3 * joint)
    assert model_flops_per_sample(fusion)["student"] > model_flops_per_sample(dual)["student"]  # cross attention
    itm = load_config("finetune_snli_ve_teacher", ["train.task=itm"])
    assert model_flops_per_sample(itm)["student"] == pytest.approx(3 * 3 * joint)  # positives + 2 negative rows
