"""Resume as a 2-node job meets it (2 gloo ranks): the main ITM pre-training job killed and
relaunched continues exactly; the ranks agree on the checkpoint they resume from; a
universal-checkpoint conversion longer than the collective timeout; a checkpoint manifest
built from each rank's own view of its files."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import record, tiny_overrides
from dist_utils import run_ranks
from test_checkpoint import launch, wait_all

pytestmark = pytest.mark.distributed


def history(run: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def itm_teacher(tmp_path_factory):
    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.saved import save_pretrained
    from dide_scale.models.student import TowerShape
    torch.manual_seed(2)
    d = tmp_path_factory.mktemp("itm") / "teacher"
    shape = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)
    save_pretrained(FusionEncoder(shape, "itm", 2), d)
    return d


def itm_args(shards, out, teacher, **extra):
    """ITM pre-training with every random part on: global hard-negative mining, ITC, attention
    and soft-label distillation, retrieval evaluation and attention probes."""
    base = {"train.task": "itm", "teacher.path": str(teacher), "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0,
            "loss.soft_label": 1.0, "loss.ground_truth": 1.0, "loss.itc": 1.0, "loss.itm_negatives": "global",
            "train.max_steps": 12, "train.save_every": 4, "train.eval_every": 4, "train.probe_every": 3,
            "train.global_batch_size": 8, "train.micro_batch_size": 2, "data.num_workers": 1, "train.keep_last": 5}
    base.update(extra)
    return ["--config", "debug", *tiny_overrides(shards, out, **base)]


def test_itm_pretraining_killed_on_every_rank_resumes_exactly(demo_shards, itm_teacher, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    for code, out in wait_all(launch(itm_args(demo_shards, full, itm_teacher))):
        assert code == 0, out[-3000:]
    procs = launch(itm_args(demo_shards, killed, itm_teacher))
    marker = killed / "checkpoints" / "step_00000004" / "COMPLETE.json"
    deadline = time.time() + 600
    while not marker.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists()
    for p in procs:  # the whole job dies at once (node loss, scancel -s KILL)
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=60)
    for code, out in wait_all(launch(itm_args(demo_shards, killed, itm_teacher))):
        assert code == 0, out[-3000:]
    a, b = history(full), history(killed)
    assert sorted(b) == list(range(1, 13))
    worst = 0.0
    for step in range(5, 13):
        for k in ("loss/loss", "loss/soft_label", "loss/ground_truth", "loss/itc", "loss/attn_t2i"):
            rel = abs(a[step][k] - b[step][k]) / max(abs(a[step][k]), 1e-12)
            worst = max(worst, rel)
            assert rel <= 1e-6, (step, k, a[step][k], b[step][k])
    log = (killed / "logs" / "rank000.log").read_text()
    assert "resuming at step 4" in log and "eval step 8" in log
    record("itm_killed_resumes_exactly", resumed_from=4, steps_compared=8, worst_relative_difference=worst)


# -- the ranks agree on the checkpoint --------------------------------------------------------

def resume_with_a_faulty_rank(args: dict) -> dict:
    """Rank 1 cannot load the newest checkpoint (ESTALE, as NFS says after a node lost its
    handle); rank 0 can."""
    from dide_scale import checkpoint, distributed
    from dide_scale.train import main
    original = checkpoint.Checkpointer._load

    def flaky(self, engine, tag, load_optimizer, group=None):
        if distributed.rank() == 1 and tag == args["bad_tag"]:
            return "load failed: OSError: [Errno 116] Stale file handle"
        return original(self, engine, tag, load_optimizer, group)
    checkpoint.Checkpointer._load = flaky
    code = main(args["argv"])
    log = Path(args["run"]) / "logs" / f"rank{distributed.rank():03d}.log"
    resumed = [line for line in log.read_text().splitlines() if "resuming at step" in line]
    return {"code": code, "resumed": resumed[-1].split("resuming at step ")[1].split()[0]}


def test_ranks_resume_from_the_same_checkpoint_when_one_cannot_read_the_newest(demo_shards, tmp_path):
    from test_checkpoint import args as ckpt_args
    run = tmp_path / "run"
    for code, out in wait_all(launch(ckpt_args(demo_shards, run))):  # checkpoints at steps 3 and 6
        assert code == 0, out[-3000:]
    res = run_ranks("test_resume:resume_with_a_faulty_rank", 2, {
        "argv": ckpt_args(demo_shards, run, **{"train.max_steps": 8}), "run": str(run),
        "bad_tag": "step_00000006"}, tmp_path)
    assert [r["code"] for r in res] == [0, 0]
    assert [r["resumed"] for r in res] == ["3", "3"]  # both from the older one, not 6 and 3
    record("one_rank_fails_to_load", newest="step_00000006", resumed_from=3, ranks_agree=True)


# -- a long universal conversion -------------------------------------------------------------

def resume_with_a_slow_conversion(args: dict) -> dict:
    """The 1-rank checkpoint resumed on 2 ranks, its conversion taking longer than the
    collective timeout."""
    from dide_scale import engine
    from dide_scale.train import main
    real = engine.convert_to_universal

    def slow(*a, **kw):
        time.sleep(args["sleep_s"])
        return real(*a, **kw)
    engine.convert_to_universal = slow
    return {"code": main(args["argv"])}


def test_universal_conversion_longer_than_the_collective_timeout(demo_shards, tmp_path):
    from test_checkpoint import args as ckpt_args

    from dide_scale.train import main
    run = tmp_path / "run"
    assert main(ckpt_args(demo_shards, run, **{"train.max_steps": 3, "train.global_batch_size": 4,
                                               "data.num_workers": 0})) == 0
    res = run_ranks("test_resume:resume_with_a_slow_conversion", 2, {
        "argv": ckpt_args(demo_shards, run, **{"train.max_steps": 5, "train.global_batch_size": 4,
                                               "data.num_workers": 0, "train.collective_timeout_s": 8}),
        "sleep_s": 12}, tmp_path)
    assert [r["code"] for r in res] == [0, 0]
    assert json.loads((run / "summary.json").read_text())["step"] == 5


# -- the manifest -------------------------------------------------------------------------------

def save_with_stale_attributes(args: dict) -> dict:
    """Rank 0 sees stale sizes for every file another rank wrote (NFS attribute caching)."""
    from dide_scale import checkpoint, distributed
    from dide_scale.train import main
    real = checkpoint.manifest

    def stale(d):
        return {k: (v if checkpoint.written_by(k, 0) else v + 1) for k, v in real(d).items()}
    if distributed.detect().rank == 0:
        checkpoint.manifest = stale
    return {"code": main(args["argv"])}


def test_manifest_sizes_come_from_the_rank_that_wrote_each_file(demo_shards, tmp_path):
    from test_checkpoint import args as ckpt_args

    from dide_scale.checkpoint import COMPLETE, verify
    run = tmp_path / "run"
    res = run_ranks("test_resume:save_with_stale_attributes", 2,
                    {"argv": ckpt_args(demo_shards, run, **{"train.max_steps": 3})}, tmp_path)
    assert [r["code"] for r in res] == [0, 0]
    d = run / "checkpoints" / "step_00000003"
    files = json.loads((d / COMPLETE).read_text())["files"]
    assert any("rank_1_" in k for k in files) and "dide_rank00001.pt" in files
    assert verify(d) is None  # rank 1's sizes were its own: the checkpoint is accepted


# -- evaluation split over ranks ----------------------------------------------------------------

def eval_worker(args: dict) -> dict:
    """Each rank evaluates its share of the split; the sums are added over ranks."""
    import torch.distributed as dist

    from dide_scale.build import build_student
    from dide_scale.config import load_config
    from dide_scale.data.pipeline import build_loader
    from dide_scale.evaluate import evaluate
    world = int(args.get("world", 1))
    if world > 1:
        dist.init_process_group("gloo")
    r = dist.get_rank() if world > 1 else 0
    cfg = load_config("debug", tiny_overrides(args["shards"], "/tmp/unused", **{
        "data.val_shards": args["val"], "data.num_workers": 1}))
    torch.manual_seed(0)
    model = build_student(cfg)
    res = evaluate(model, build_loader(cfg, "val", r, world, batch_size=5), "vqa", "cpu")
    if world > 1:
        dist.destroy_process_group()
    return res


def test_evaluation_split_over_ranks_equals_one_process(demo_shards, tmp_path):
    """3 shards over 2 ranks (2 and 1: the second rank runs out first and repeats its last batch,
    uncounted): the same accuracy, count and per-type figures as one process on the whole split."""
    from dide_scale.data.demo import generate_split
    val = generate_split(tmp_path / "val", 3 * 17, 4, "vqa", samples_per_shard=17)
    args = {"shards": str(demo_shards), "val": f"{val}/{{00000..00002}}.tar"}
    one = eval_worker(args)
    two = run_ranks("test_resume:eval_worker", 2, {**args, "world": 2}, tmp_path)
    assert one["n"] == 51
    for res in two:
        assert res["n"] == one["n"] and res["per_type"] == pytest.approx(one["per_type"], abs=1e-12)
        assert res["accuracy"] == pytest.approx(one["accuracy"], abs=1e-12)
    # through the trainer at ZeRO-3, whose forwards gather parameters collectively: no hang
    run = tmp_path / "z3"
    for code, out in wait_all(launch(["--config", "debug", *tiny_overrides(demo_shards, run, **{
            "data.val_shards": f"{val}/{{00000..00002}}.tar", "train.zero_stage": 3, "train.max_steps": 2,
            "data.num_workers": 1})])):
        assert code == 0, out[-3000:]
    assert json.loads((run / "summary.json").read_text())["eval"]["n"] == 51
