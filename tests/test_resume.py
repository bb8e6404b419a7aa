"""Resume as a 2-node job meets it (2 gloo ranks): the main ITM pre-training job killed and
relaunched continues exactly; the ranks agree on the checkpoint they resume from; a
universal-checkpoint conversion longer than the collective timeout; a checkpoint manifest
built from each rank's own view of its files."""
from __future__ import annotations

import json
import re
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
    """Rank 1 cannot open its files of the newest checkpoint (ESTALE, as NFS says after a node
    lost its handle); rank 0 can."""
    import builtins
    import errno

    from dide_scale import distributed
    from dide_scale.train import main
    if distributed.detect().rank == 1:
        real_open = builtins.open

        def stale_open(file, *a, **kw):
            if args["bad_tag"] in str(file):
                raise OSError(errno.ESTALE, "Stale file handle", str(file))
            return real_open(file, *a, **kw)
        builtins.open = stale_open  # torch.load and our own reads open files through it
    code = main(args["argv"])
    log = (Path(args["run"]) / "logs" / f"rank{distributed.rank():03d}.log").read_text()
    resumed = [line for line in log.splitlines() if "resuming at step" in line]
    skipped = [line for line in log.splitlines() if "skipping checkpoint" in line]
    return {"code": code, "resumed": resumed[-1].split("resuming at step ")[1].split()[0], "skipped": skipped}


def test_ranks_resume_from_the_same_checkpoint_when_one_cannot_read_the_newest(demo_shards, tmp_path, partition_all):
    """At ZeRO-3 with every tensor partitioned: the ranks agree that rank 1 cannot read the
    newest checkpoint before any of them enters DeepSpeed's load (whose collectives a rank
    voting on the CPU group instead would hang), and resume together from the one before."""
    from test_checkpoint import args as ckpt_args
    run = tmp_path / "run"
    z3 = {"train.zero_stage": 3, "train.ds_config": partition_all}
    for code, out in wait_all(launch(ckpt_args(demo_shards, run, **z3))):  # checkpoints at steps 3 and 6
        assert code == 0, out[-3000:]
    res = run_ranks("test_resume:resume_with_a_faulty_rank", 2, {
        "argv": ckpt_args(demo_shards, run, **z3, **{"train.max_steps": 8, "train.collective_timeout_s": 60}),
        "run": str(run), "bad_tag": "step_00000006"}, tmp_path)
    assert [r["code"] for r in res] == [0, 0]
    assert [r["resumed"] for r in res] == ["3", "3"]  # both from the older one, not 6 and 3
    assert "Stale file handle" in res[1]["skipped"][-1]
    assert "another rank could not read its files" in res[0]["skipped"][-1]  # rank 0 never began loading step 6
    assert re.search(r"ZeRO-3: (\d+) of the student's \1 parameter tensors partitioned",
                     (run / "logs" / "rank000.log").read_text())
    record("one_rank_fails_to_load", newest="step_00000006", resumed_from=3, ranks_agree=True, zero_stage=3)


def convert_fails_on_rank0(args: dict) -> dict:
    """Rank 0's universal conversion fails with an OSError (not a failed conversion command)."""
    import torch.distributed as dist

    from dide_scale import checkpoint, engine
    dist.init_process_group("gloo")

    def broken(*a, **kw):
        raise OSError(122, "Disk quota exceeded")
    engine.convert_to_universal = broken
    t0 = time.time()
    error = checkpoint.Checkpointer(args["run"])._universal("step_00000003", poll_s=0.05, timeout_s=args["timeout_s"])
    dist.destroy_process_group()
    return {"error": error, "seconds": time.time() - t0}


def test_an_oserror_in_rank0s_universal_conversion_ends_the_others_wait(tmp_path):
    """The other ranks wait for rank 0's conversion on the filesystem; an OSError (not only a
    failed conversion) leaves the failure marker that ends their wait at once.  Before, only a
    RuntimeError did, and they polled for the whole timeout (4 hours by default)."""
    res = run_ranks("test_resume:convert_fails_on_rank0", 2, {"run": str(tmp_path / "run"), "timeout_s": 120},
                    tmp_path)
    assert all("Disk quota exceeded" in r["error"] for r in res), res
    assert res[1]["seconds"] < 60  # ended by the marker, not by the timeout
    record("conversion_oserror", seconds_rank1_waited=round(res[1]["seconds"], 2), wait_timeout_s=120)


# -- a stop signal while one rank waits for data ----------------------------------------------

def stall_rank_one(args: dict) -> dict:
    """Rank 1's data reader stops answering after ``after`` samples (a hung file server seen
    by one node only); rank 0's goes on.  Returns the exit code and the control group's timeout."""
    import os

    from dide_scale import distributed, trainer
    from dide_scale.data import pipeline
    from dide_scale.train import main
    if distributed.detect().rank == 1:
        real = pipeline.iter_raw_samples
        read = {"n": 0}

        def stalling(*a, **kw):
            for raw in real(*a, **kw):
                read["n"] += 1
                if read["n"] > args["after"]:
                    Path(args["marker"]).write_text(str(os.getpid()))
                    time.sleep(3600)
                yield raw
        pipeline.iter_raw_samples = stalling
    seen = {}
    real_init = trainer.Trainer.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        seen["control_timeout_s"] = self.control._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    trainer.Trainer.__init__ = init
    return {"code": main(args["argv"]), **seen}


def test_a_stop_signal_while_one_rank_waits_for_data_checkpoints_on_every_rank(demo_shards, tmp_path):
    """SIGUSR1 to both ranks while rank 1 waits for data and rank 0 has its batches: both
    checkpoint the last complete step and exit 42 at once.  Before, rank 0 sat in the step's
    gradient all-reduce while rank 1 voted on the CPU group: a deadlock until the collective
    timeout, longer than SLURM's warning, so the job timed out instead of requeueing."""
    from dist_utils import collect, spawn_ranks
    from test_checkpoint import args as ckpt_args

    from dide_scale.train import REQUEUE_EXIT_CODE
    run, marker = tmp_path / "run", tmp_path / "stalled"
    procs = spawn_ranks("test_resume:stall_rank_one", 2, {
        "argv": ckpt_args(demo_shards, run, **{"train.max_steps": 100, "train.collective_timeout_s": 30}),
        "after": 24, "marker": str(marker)}, tmp_path)
    deadline = time.time() + 300
    while not marker.exists() and all(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    time.sleep(2.0)  # rank 0 is well past its own data by now
    t0 = time.time()
    for p in procs:
        p.send_signal(signal.SIGUSR1)
    res = collect(procs, tmp_path, timeout=120)
    exit_s = time.time() - t0
    assert [r["code"] for r in res] == [REQUEUE_EXIT_CODE] * 2
    assert [r["control_timeout_s"] for r in res] == [30.0, 30.0]  # not torch's 30-minute default
    step = json.loads((run / "summary.json").read_text())["step"]
    assert (run / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert "stop signal arrived while waiting" in (run / "logs" / "rank001.log").read_text()
    record("stop_while_one_rank_waits", seconds_signal_to_exit=round(exit_s, 1), checkpoint_step=step,
           exit_codes=[r["code"] for r in res], collective_timeout_s=30)


# -- exports while the other ranks train -----------------------------------------------------

def slow_in_process_exports(args: dict) -> dict:
    """Every export this process runs itself takes ``sleep_s`` longer than the collective
    timeout (a large model's consolidation)."""
    from dide_scale import export
    from dide_scale.train import main
    real = export.export_from_checkpoint

    def slow(*a, **kw):
        time.sleep(args["sleep_s"])
        return real(*a, **kw)
    export.export_from_checkpoint = slow
    return {"code": main(args["argv"])}


def test_exports_do_not_hold_the_other_ranks_in_a_collective(demo_shards, tmp_path):
    """Consolidating a checkpoint for an export takes longer than train.collective_timeout_s:
    new best models are exported by a process of rank 0's own while both ranks train on, and
    at the end rank 1 waits for rank 0's final export on the CPU group, without a timeout
    of a collective.  Before, rank 0 exported in the loop (and before the final barrier)
    while rank 1 waited in the next collective, which timed out."""
    from test_checkpoint import args as ckpt_args
    run = tmp_path / "run"
    res = run_ranks("test_resume:slow_in_process_exports", 2, {
        "argv": ckpt_args(demo_shards, run, **{"train.max_steps": 6, "train.eval_every": 2, "train.save_every": 0,
                                               "train.collective_timeout_s": 15}), "sleep_s": 20}, tmp_path)
    assert [r["code"] for r in res] == [0, 0]
    summary = json.loads((run / "summary.json").read_text())
    best = json.loads((run / "best" / "best.json").read_text())
    assert summary["best"]["step"] == best["step"] and best["step"] in (2, 4, 6)
    assert (run / "export" / "model.safetensors").exists() and (run / "best" / "model.safetensors").exists()
    log = (run / "logs" / "rank000.log").read_text()
    assert "exporting in the background" in log and f"exported step_{best['step']:08d}" in log
    record("slow_export", export_s=20, collective_timeout_s=15, exit_codes=[0, 0], best_step=best["step"])


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

    def stale(d, names=None):
        return {k: (v if checkpoint.written_by(k, 0) else v + 1) for k, v in real(d, names).items()}
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
    # the parts that are the same on every rank are written once, by rank 0
    own = [torch.load(d / f"dide_rank{r:05d}.pt", weights_only=True)["state"] for r in (0, 1)]
    assert set(own[0]) == {"train", "data", "rng", "best"} and set(own[1]) == {"data", "rng"}


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


def test_evaluation_split_over_ranks_equals_one_process(demo_shards, tmp_path, partition_all):
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
            "train.ds_config": partition_all, "data.num_workers": 1})])):
        assert code == 0, out[-3000:]
    assert json.loads((run / "summary.json").read_text())["eval"]["n"] == 51
    for r in (0, 1):  # with every tensor partitioned on both ranks
        assert re.search(r"ZeRO-3: (\d+) of the student's \1 parameter tensors partitioned",
                         (run / "logs" / f"rank{r:03d}.log").read_text()), r
