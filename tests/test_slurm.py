"""The launchers on a real SLURM cluster started on localhost (two emulated nodes, see
tests/slurm_cluster.py): slurm/pretrain.sbatch and dide-submit, including preemption
and requeue.  Every job is a tiny 2-rank CPU run of the debug config.

A preempted run must end exactly where an uninterrupted one does: same steps, same
losses step by step (resume restores weights, optimizer, RNG and the data position) and
the same data position at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides
from slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# ~0.05 s each: a window of seconds to signal in (SLURM takes up to ~1 s to deliver), and still seconds in all
STEPS = 80
RUN = {"train.max_steps": STEPS, "train.global_batch_size": 16, "train.micro_batch_size": 4,
       "train.log_every": 1, "data.num_workers": 0}
JOB_TIMEOUT = 150  # a cold DeepSpeed start is ~10 s here; a requeue adds ~6 s


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus_per_node=2, cred_expire=5)
    why = cluster.start()
    if why:
        cluster.stop()
        pytest.skip(f"no local SLURM cluster: {why}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def job_env(slurm):
    """Environment of every job (sbatch/submitit pass it on: --export=ALL)."""
    # A private torch-extensions folder: DeepSpeed's CPU shm op is JIT-built, and the shared
    # ~/.cache/torch_extensions is rebuilt (~80 s) whenever ninja 1.11 (/usr/bin) and the
    # venv's ninja 1.13 take turns on it.  Same PATH here as in the jobs: same ninja.
    venv_id = hashlib.sha1(sys.prefix.encode()).hexdigest()[:8]
    ext = Path.home() / ".cache" / "dide_scale" / f"torch_extensions-{venv_id}"
    env = slurm.env(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", DS_ACCELERATOR="cpu",
                    OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TORCH_EXTENSIONS_DIR=str(ext),
                    PYTHONUNBUFFERED="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    build = subprocess.run(  # once, in one process, before the timed jobs (a no-op when up to date)
        [sys.executable, "-c", "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load(False)"],
        env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    return env


@pytest.fixture(scope="module")
def reference_run(slurm, job_env, demo_shards, tmp_path_factory):
    """pretrain.sbatch as a 2-node job (1 task per node), never interrupted."""
    tmp = tmp_path_factory.mktemp("ref")
    run_dir = tmp / "run"
    t0 = time.time()
    job = sbatch_pretrain(slurm, job_env, tmp, tiny_overrides(demo_shards, run_dir, **RUN, **{"train.save_every": 10}))
    info = slurm.wait_state(job, {"COMPLETED"}, JOB_TIMEOUT)
    return {"job": job, "info": info, "run_dir": run_dir, "log": tmp / f"dide-pretrain-{job}.out",
            "seconds": time.time() - t0}


# -- helpers ----------------------------------------------------------------------------
def sbatch_pretrain(cluster: SlurmCluster, env: dict, tmp: Path, overrides: list[str]) -> str:
    return cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", "--time=10", f"--output={tmp}/%x-%j.out",
                           str(REPO / "slurm" / "pretrain.sbatch"), "debug", *overrides], env=env, cwd=tmp)


def metrics(run_dir: Path) -> list[dict]:
    p = run_dir / "logs" / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def wait_for_step(cluster: SlurmCluster, job: str, run_dir: Path, step: int, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m["step"] >= step for m in metrics(run_dir)):
            return
        st = cluster.state(job)
        assert st in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job} is {st} before step {step}"
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not reach step {step} in {timeout} s\n{cluster.logs()}")


def complete_checkpoints(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in d.glob("step_*") if (p / "COMPLETE.json").exists())


def data_position(run_dir: Path, step: int) -> dict:
    own = torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "dide_rank00000.pt", weights_only=True)
    own["state"]["data"].pop("num_workers")  # 0 and 1 worker read the same single stream
    return {k: own["state"][k] for k in ("train", "data")}


def assert_resumed_like_reference(run_dir: Path, reference: Path) -> int:
    """Finished, continuous, identical to the uninterrupted run; returns the preemption step."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["exit_code"] == 0
    got, want = metrics(run_dir), metrics(reference)
    assert [m["step"] for m in got] == list(range(1, STEPS + 1)), "steps lost or repeated across the requeue"
    assert [m["loss/loss"] for m in got] == pytest.approx([m["loss/loss"] for m in want], rel=1e-5)
    assert [m["progress/samples_seen"] for m in got] == [m["progress/samples_seen"] for m in want]
    assert data_position(run_dir, STEPS) == data_position(reference, STEPS)  # data position intact
    rank0 = (run_dir / "logs" / "rank000.log").read_text()
    assert "stop signal received: checkpointing at step" in rank0
    stopped = int(rank0.split("stop signal received: checkpointing at step ")[1].split()[0])
    assert stopped < STEPS and stopped in complete_checkpoints(run_dir), "no checkpoint from the preemption"
    assert f"resuming at step {stopped}" in rank0
    return stopped


# -- tests ------------------------------------------------------------------------------
def test_sbatch_scripts_are_valid_bash():
    for name in ("pretrain.sbatch", "finetune.sbatch"):
        subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], check=True)
    pre = (REPO / "slurm" / "pretrain.sbatch").read_text()
    for directive in ("--requeue", "--signal=B:USR1@", "--open-mode=append"):
        assert f"#SBATCH {directive}" in pre, directive
    assert "scontrol requeue" in pre and "srun " in pre
    # finetune.sbatch is a wrapper of pretrain.sbatch: the same directives (sbatch reads them from
    # the file it is given) under another job name, then pretrain.sbatch itself
    fine = (REPO / "slurm" / "finetune.sbatch").read_text()
    def directives(text):
        return [line for line in text.splitlines() if line.startswith("#SBATCH") and "--job-name" not in line]
    assert directives(fine) == directives(pre) and "#SBATCH --job-name=dide-finetune" in fine
    assert 'exec bash "$HERE/pretrain.sbatch" finetune "$@"' in fine and "srun" not in fine


def test_pretrain_sbatch_two_nodes(slurm, reference_run):
    info, run_dir = reference_run["info"], reference_run["run_dir"]
    assert info["NodeList"] == "node[1-2]" and info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    log = reference_run["log"].read_text()
    assert "2 node(s) node[1-2] x 1 task(s), rendezvous node1" in log
    assert "trainer exit code 0" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == STEPS and summary["exit_code"] == 0
    assert "world 2" in (run_dir / "logs" / "rank000.log").read_text()  # one rank per node, one process group
    assert (run_dir / "logs" / "rank001.log").exists()
    assert complete_checkpoints(run_dir) == [STEPS - 20, STEPS - 10, STEPS]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{STEPS:08d}"
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, STEPS + 1))
    print(f"sbatch 2-node job: {reference_run['seconds']:.1f} s")


def test_pretrain_sbatch_preempted_and_requeued(slurm, job_env, reference_run, demo_shards, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    job = sbatch_pretrain(slurm, job_env, tmp_path, tiny_overrides(demo_shards, run_dir, **RUN))
    wait_for_step(slurm, job, run_dir, 2)
    # what the time-limit warning (--signal=B:USR1@120) does: only the batch shell gets it
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    info = slurm.wait_state(job, {"COMPLETED"}, JOB_TIMEOUT)
    assert info["Restarts"] == "1", info
    log = (tmp_path / f"dide-pretrain-{job}.out").read_text()
    # 42, not 143: rank 1 exits 0 and rank 0 reports the requeue, so srun's --kill-on-bad-exit
    # does not cut rank 0 short (it did when every rank exited 42)
    assert "trainer exit code 42 (signals: USR1)" in log and "requeueing" in log and " restart 1:" in log
    assert "task 1: Exited with exit code" not in log  # srun names every task that exits non-zero
    stopped = assert_resumed_like_reference(run_dir, reference_run["run_dir"])
    print(f"sbatch preempted at step {stopped}, requeued, finished: {time.time() - t0:.1f} s")


def test_pretrain_sbatch_requeued_by_slurm(slurm, job_env, reference_run, demo_shards, tmp_path):
    """An admin requeue / preemption: SLURM sends SIGTERM to every process of the job and
    requeues it itself; the ranks checkpoint within KillWait, the script must not requeue
    (the same path keeps a `scancel`led job cancelled)."""
    run_dir = tmp_path / "run"
    # with a data-loader worker: SLURM's SIGTERM reaches the workers too, and they must not die
    job = sbatch_pretrain(slurm, job_env, tmp_path, tiny_overrides(demo_shards, run_dir, **{**RUN,
                                                                                            "data.num_workers": 1}))
    wait_for_step(slurm, job, run_dir, 2)
    slurm.run("scontrol", "requeue", job)
    info = slurm.wait_state(job, {"COMPLETED"}, JOB_TIMEOUT)
    assert info["Restarts"] == "1", info
    log = (tmp_path / f"dide-pretrain-{job}.out").read_text()
    assert "trainer exit code 42 (signals: TERM" in log and "requeueing" not in log
    assert_resumed_like_reference(run_dir, reference_run["run_dir"])


def test_dide_submit_slurm_preempted_and_requeued(slurm, job_env, reference_run, demo_shards, tmp_path):
    """dide-submit (submitit's slurm executor): 2 nodes; submitit's own warning signal
    (USR2) on the steps; every rank checkpoints, rank 0 requeues, results come back.  The
    cluster runs with KillOnBadExit=1: a rank that exits non-zero before rank 0 has requeued
    would have the job killed and never requeued."""
    run_dir = tmp_path / "run"
    t0 = time.time()
    cmd = [str(VENV_BIN / "dide-submit"), "--cluster", "slurm", "--nodes", "2", "--tasks-per-node", "1",
           "--time", "10", "--partition", "debug", "--mem-gb", "1", "--wait", "--config", "debug",
           *tiny_overrides(demo_shards, run_dir, **RUN)]
    proc = subprocess.Popen(cmd, env=job_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("submitted slurm job "), first + proc.stdout.read()
        job = first.split()[3].rstrip(":")
        wait_for_step(slurm, job, run_dir, 2)
        slurm.run("scancel", "--signal=USR2", job)  # = submitit's --signal=USR2@<delay>, on every task
        out, _ = proc.communicate(timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, first + out
    assert f"job {job} finished: {{'step': {STEPS}," in out, out
    assert slurm.job(job)["Restarts"] == "1"
    stopped = assert_resumed_like_reference(run_dir, reference_run["run_dir"])
    # the requeue went through submitit's own path: the resubmission pickle was rewritten
    assert f"Requeued job {job}" in (run_dir / "submitit" / f"{job}_0_log.out").read_text()
    print(f"dide-submit slurm preempted at step {stopped}, requeued, finished: {time.time() - t0:.1f} s")


def test_dide_submit_local_executor_requeues(job_env, reference_run, demo_shards, tmp_path):
    """The laptop path: submitit's local executor, 2 processes; the warning signal,
    checkpoint on both ranks, submitit's local requeue (exit 144, restart), finish."""
    from dide_scale import distributed
    from dide_scale.launch import submit
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(demo_shards, run_dir, **RUN)
    args = submit.build_parser().parse_args(["--cluster", "local", "--tasks-per-node", "2", "--time", "10",
                                             "--config", "debug", *overrides])
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(job_env)  # the local executor's tasks inherit this process's environment
    try:
        ex = submit.make_executor(args, str(run_dir / "submitit"))
        job = ex.submit(submit.TrainJob("debug", overrides, str(run_dir), distributed.free_port()))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    deadline = time.time() + JOB_TIMEOUT
    while not any(m["step"] >= 2 for m in metrics(run_dir)):
        assert job.state == "RUNNING" and time.time() < deadline, job.state
        time.sleep(0.1)
    # what the local controller does 30 s before --time: submitit's signal to every task
    tasks = subprocess.run(["pgrep", "-P", str(job._process.pid)], capture_output=True, text=True).stdout.split()
    assert len(tasks) == 2, tasks
    for pid in tasks:
        os.kill(int(pid), signal.SIGUSR2)
    results = job.results()
    assert results[0]["step"] == STEPS and results[0]["exit_code"] == 0
    assert_resumed_like_reference(run_dir, reference_run["run_dir"])


def test_dide_submit_rejects_bad_config_before_submitting(tmp_path, capsys):
    from dide_scale.launch import submit
    rc = submit.main(["--cluster", "local", "--tasks-per-node", "3", "--config", "debug",
                      f"train.output_dir={tmp_path}/run", "train.global_batch_size=16", "train.micro_batch_size=4"])
    assert rc == 2
    assert "not a multiple" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dide_submit_reports_an_sbatch_refusal_in_one_line(slurm, job_env, demo_shards, tmp_path):
    """sbatch refuses the job (an unknown partition): one line with sbatch's own message,
    not submitit's traceback."""
    cmd = [str(VENV_BIN / "dide-submit"), "--cluster", "slurm", "--partition", "no-such-partition", "--time", "5",
           "--config", "debug", *tiny_overrides(demo_shards, tmp_path / "run", **RUN)]
    proc = subprocess.run(cmd, env=job_env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dide-submit: error: the job was not submitted: "), proc.stderr
    assert "partition" in lines[0].lower()
