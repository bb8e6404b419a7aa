"""Shared fixtures: tiny demo shards and tiny configs, made by the tests themselves."""
from __future__ import annotations

import hashlib  # noqa: E402
import json
import os
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# the venv's tools first, and a DeepSpeed op cache of its own: two ninja versions sharing
# ~/.cache/torch_extensions rebuild the CPU comm op (70 s) every time they alternate
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dide_scale" /
                      f"torch_extensions-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]}"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TINY_ARCH = "{width: 32, depth: 2, heads: 2, patch_size: 8, image_size: [32, 32], max_text_len: 16, vocab_size: 128}"


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """VQA demo shards: train (4 x 64 samples), val (1 x 48)."""
    from dide_scale.data.demo import generate_split
    root = tmp_path_factory.mktemp("demo")
    generate_split(root / "train", 256, 0, "vqa", samples_per_shard=64)
    generate_split(root / "val", 48, 1, "vqa", samples_per_shard=64)
    return root


def tiny_overrides(shards, out_dir, **extra) -> list[str]:
    """key=value overrides for a tiny VQA run on ``demo_shards``."""
    ov = {
        "student.arch": TINY_ARCH, "teacher.arch": TINY_ARCH,
        "data.train_shards": f"{shards}/train/{{00000..00003}}.tar", "data.val_shards": f"{shards}/val/00000.tar",
        "data.tokenizer": "builtin:demo", "data.num_answers": 16, "data.num_workers": 0,
        "data.image_shorter": 32, "data.image_longer": 32,
        "train.task": "vqa", "train.output_dir": str(out_dir), "train.max_steps": 4,
        "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.log_every": 1,
        "loss.attn_t2i": 0.0, "loss.attn_i2t": 0.0, "loss.soft_label": 0.0, "loss.ground_truth": 1.0,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def record(name: str, **figures) -> None:
    """Observed figures for docs/RELIABILITY.md: appended as JSON lines to the file named by
    DIDE_RELIABILITY_REPORT (tools/reliability_report.py sets it and renders the table)."""
    path = os.environ.get("DIDE_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": name, **figures}) + "\n")


def labelled(model):
    """A test model carrying the demo's label names for its task (every export records them as
    id2label, and a teacher without them is refused)."""
    from dide_scale.data.demo import ANSWERS
    from dide_scale.labels import NLVR2_NAMES, SNLI_VE_NAMES
    model.labels = {"vqa": list(ANSWERS), "snli_ve": list(SNLI_VE_NAMES), "nlvr2": list(NLVR2_NAMES)}.get(model.task)
    return model


def put_in_hub_cache(cache, repo_id: str, src) -> Path:
    """Files of ``src`` as the cached snapshot of Hub repository ``repo_id`` under ``cache`` (the
    layout huggingface_hub reads offline: refs/main -> snapshots/<commit>/), so a test resolves
    a Hub id without the network."""
    import shutil
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    shutil.copytree(src, snap, dirs_exist_ok=True)
    return snap


@pytest.fixture(scope="session")
def partition_all(tmp_path_factory) -> str:
    """``train.ds_config`` for ZeRO-3 runs that really partition: DeepSpeed keeps every tensor
    under ``stage3_param_persistence_threshold`` (1e5 elements by default) whole on every rank,
    and every test model is below it, so without this no parameter would be partitioned."""
    p = tmp_path_factory.mktemp("ds") / "partition_all.json"
    p.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    return str(p)


@pytest.fixture(scope="session")
def itm_teacher(tmp_path_factory):
    """A tiny ITM fusion teacher (random weights: what is tested is the machinery)."""
    import torch

    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.saved import save_pretrained
    from dide_scale.models.student import TowerShape
    torch.manual_seed(2)
    d = tmp_path_factory.mktemp("itm") / "teacher"
    shape = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)
    save_pretrained(FusionEncoder(shape, "itm", 2), d)
    return d


# The longest files first (a file stays on one xdist worker: ``--dist loadfile`` in setup.cfg, and
# ``--no-loadscope-reorder`` keeps this order instead of xdist's most-tests-first),
# so that neither worker ends the run alone with a long file (the order: the files' total
# durations in one serial run, `pytest --durations=0`, longest first).
LONGEST_FIRST = ["test_slurm.py", "test_resume.py", "test_caption.py", "test_engine.py", "test_reproduce.py",
                 "test_checkpoint.py", "test_demo_teachers.py", "test_cluster.py", "test_first_hour.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: file order kept within
