import json
from pathlib import Path

import pytest

from dide_scale.config import ConfigError, load_config, shipped_configs
from dide_scale.engine import build_ds_config, validate_ds_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.train.task in ("itm", "vqa", "nlvr2", "snli_ve", "caption")
    build_ds_config(cfg, 1)


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_ds_config_is_valid(path):
    ds = json.loads(path.read_text())
    validate_ds_config(ds, path.name)
    stage = ds["zero_optimization"]["stage"]
    cfg = load_config("debug", [f"train.ds_config={path}", f"train.zero_stage={stage}",
                                f"train.offload={'true' if 'offload_param' in ds['zero_optimization'] else 'false'}"])
    out = build_ds_config(cfg, 1)
    assert out["zero_optimization"]["stage"] == stage
    assert out["gradient_clipping"] == cfg.train.grad_clip


def test_layers_defaults_yaml_overrides():
    cfg = load_config("debug", ["train.max_steps=7", "optim.betas=[0.8, 0.9]", "student.arch.width=64",
                                "student.arch.heads=4", "teacher.arch.heads=4", "teacher.arch.width=64"])
    assert cfg.train.max_steps == 7 and cfg.optim.betas == [0.8, 0.9]
    assert cfg.student.arch.depth == 2  # from debug.yaml
    assert cfg.optim.weight_decay == 0.01  # from the dataclass default


@pytest.mark.parametrize("override, key", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("student.arch.widht=3", "student.arch.widht"),
    ("train.max_steps=ten", "train.max_steps"),
    ("train.zero_stage=1.5", "train.zero_stage"),
    ("data.resampled=yes please", "data.resampled"),
    ("train.global_batch_size=10", "train.global_batch_size"),
    ("train.offload=true", "train.offload"),
    ("student.arch.heads=5", "student.arch.width"),
    ("student.arch.image_size=[30, 32]", "student.arch.image_size"),
    ("loss.attn_t2i=1.0", "teacher.path"),
    ("train.precision=fp8", "train.precision"),
    ("train.eval_retrieval_k=5", "train.eval_retrieval_k"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config("debug", [override])


def test_batch_arithmetic_checked_against_world_size():
    with pytest.raises(ConfigError, match="global_batch_size"):
        load_config("debug", ["train.global_batch_size=16", "train.micro_batch_size=8"], world_size=3)
    assert load_config("debug", [], world_size=2).grad_accum_steps(2) == 1
    # the shipped presets beyond the world sizes they were written for: the error says what to set,
    # and what it says fits
    for name, world in (("finetune_vqa", 16), ("finetune_nlvr2", 32), ("pretrain_b32", 128), ("finetune_vqa", 12)):
        with pytest.raises(ConfigError, match=r"is not a multiple of .* set train\.") as e:
            load_config(name, world_size=world)
        fix = str(e.value).split(": set ")[1].split(" (")[0].split()
        assert load_config(name, fix, world_size=world).grad_accum_steps(world) >= 1


def test_ds_config_conflicts_fail(tmp_path):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_batch_size": 999, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="train_batch_size"):
        build_ds_config(load_config("debug", [f"train.ds_config={p}"]), 1)
    p.write_text(json.dumps({"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="offload_param"):
        build_ds_config(load_config("debug", [f"train.ds_config={p}"]), 1)


def test_resolved_config_round_trips(tmp_path):
    import yaml

    from dide_scale.config import config_from_dict, save_resolved
    cfg = load_config("debug", ["train.max_steps=3"])
    save_resolved(cfg, tmp_path, {"a": 1})
    back = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert back == cfg
    assert json.loads((tmp_path / "ds_config.json").read_text()) == {"a": 1}


@pytest.mark.parametrize("override, choices", [
    ("train.task=vqq", "'itm', 'vqa', 'nlvr2', 'snli_ve'"),
    ("train.zero_stage=4", "0, 1, 2, 3"),
    ("teacher.zero_stage=2", "0, 3"),
    ("loss.head_map=max", "'per_head', 'mean'"),
    ("data.image_resize=crop", "'vilt', 'stretch'"),
    ("train.eval_retrieval=topk", "'rerank', 'itc', 'itm'"),
])
def test_choice_fields_name_their_choices(override, choices):
    key, value = override.split("=")
    with pytest.raises(ConfigError) as e:
        load_config("debug", [override])
    assert str(e.value).startswith(f"{key}=") and choices in str(e.value)


def test_each_job_of_the_reproduce_recipe_fits_the_ranks_it_asks_for():
    """docs/REPRODUCE.md's sbatch lines as a user submits them: the preset's batch must divide
    over --nodes x the GPUs per node the document assumes (the rehearsal shrinks the batch, so
    only this catches a recipe that stops at its first line on the real cluster)."""
    import re
    import shlex

    from test_reproduce import DOC, recipe
    gpus = int(re.search(r"(\d+) GPUs\s+per node", DOC.read_text()).group(1))
    jobs = [shlex.split(cmd) for lang, cmd in recipe() if lang == "bash" and cmd.startswith("sbatch")]
    assert len(jobs) == 5
    for argv in jobs:
        script = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
        m = re.search(r"(?:--nodes[= ]|-N ?)(\d+)", " ".join(argv[:script]))
        nodes = int(m.group(1)) if m else 1  # the scripts' own #SBATCH --nodes=1
        load_config(argv[script + 1], argv[script + 2:], world_size=nodes * gpus)
