"""What a real cluster does to a job, checked on CPU where the logic allows: which GPU a rank
takes, rendezvous ports, fp16 overflow steps, resources per task, the DeepSpeed dtypes, and
the run-directory lease that keeps a second job out."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import record, tiny_overrides

from dide_scale import distributed
from dide_scale.config import ConfigError, load_config
from dide_scale.lease import LEASE, LeaseHeld, RunLease

# -- devices, ports, resources -------------------------------------------------------------

def test_a_rank_takes_its_gpu_among_the_visible_ones(monkeypatch):
    # srun --gpus-per-task=1 / --gpu-bind: each task sees only its own GPU, as device 0
    assert distributed.device_index(5, 1) == 0
    assert distributed.device_index(3, 8) == 3  # all of the node's GPUs visible
    with pytest.raises(RuntimeError, match="sees only 2 GPUs"):
        distributed.device_index(3, 2)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        distributed.device_index(0, 0)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        monkeypatch.setenv(var, "x")  # export() writes them: monkeypatch restores (or removes) them afterwards
    env = distributed.DistEnv(13, 5, 16, "node1", 12345, "srun")
    env.export(visible_gpus=1)
    assert os.environ["LOCAL_RANK"] == "0" and os.environ["RANK"] == "13"  # DeepSpeed selects cuda:LOCAL_RANK
    env.export(visible_gpus=8)
    assert os.environ["LOCAL_RANK"] == "5"
    env.export()  # CPU: the local rank as it is
    assert os.environ["LOCAL_RANK"] == "5"


def test_rendezvous_ports_stay_below_the_ephemeral_range():
    ports = {distributed.rendezvous_port(j) for j in range(0, 200_000, 7)}
    assert min(ports) >= 10000 and max(ports) < 30000 < 32768
    assert distributed.rendezvous_port(123) == distributed.rendezvous_port(123)  # a requeue keeps it
    env = distributed.detect({"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2",
                              "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "4242"})
    assert env.master_port == 14242


def test_dide_submit_kills_the_step_on_a_bad_exit_and_runs_one_thread_per_rank(tmp_path, monkeypatch):
    """The sbatch script submitit writes for dide-submit: srun --kill-on-bad-exit=1 (one crashed
    rank ends the step instead of leaving the other GPUs in a collective until its timeout)
    unless --srun-args says otherwise, and OMP_NUM_THREADS=1 unless the environment sets it.
    Only the script's text is read: submitit's Slurm executor wants an ``srun`` on PATH, which a
    machine without SLURM gets as a stand-in that is never run."""
    import shutil

    from dide_scale.launch import submit
    if shutil.which("srun") is None:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / "srun").chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    args = submit.build_parser().parse_args(["--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "8",
                                             "--srun-args=--cpu-bind=none"])
    text = submit.make_executor(args, str(tmp_path))._executor._make_submission_file_text("true", "x")
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in srun and "--cpu-bind=none" in srun
    assert "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}" in text.split(srun)[0]
    assert submit.srun_args("-K0 --mpi=none") == ["-K0", "--mpi=none"]  # the user's own choice stays


def test_the_batch_script_forwards_a_warning_but_not_a_termination(tmp_path):
    """slurm/pretrain.sbatch with a stand-in srun (records the signals it gets, exits 42 on TERM
    as the trainer does) and scontrol: a USR1 to the batch shell is forwarded and the job
    requeued; a SIGTERM (SLURM signals the ranks itself) is not forwarded as a USR1, which
    made rank 0 spend its kill grace on a requeue report, and nothing is requeued."""
    import signal as sig
    from pathlib import Path
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        "trap 'echo USR1 >> \"$SIGNALS\"; exit 42' USR1\n"
        "trap 'echo TERM >> \"$SIGNALS\"; exit 42' TERM\n"
        "echo $$ > \"$READY\"\n"
        "for i in $(seq 600); do sleep 0.1; done\n")
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho \"$@\" >> \"$SCONTROL\"\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "slurm" / "pretrain.sbatch"

    def run(signal_to_shell, also_to_srun):
        d = tmp_path / sig.Signals(signal_to_shell).name
        d.mkdir()
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", DIDE_MASTER_ADDR="node1",
                   SIGNALS=str(d / "signals"), READY=str(d / "ready"), SCONTROL=str(d / "scontrol"))
        shell = subprocess.Popen(["bash", str(script), "debug"], env=env, cwd=d, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 30
        while not (d / "ready").exists() and time.time() < deadline:
            time.sleep(0.05)
        srun_pid = int((d / "ready").read_text())
        shell.send_signal(signal_to_shell)
        time.sleep(0.5)  # the trap runs (and forwards, or not)
        if also_to_srun:
            os.kill(srun_pid, sig.SIGTERM)  # what SLURM does to every process of the step
        out, _ = shell.communicate(timeout=30)
        def read(f):
            return f.read_text().split() if f.exists() else []
        return shell.returncode, read(d / "signals"), read(d / "scontrol"), out
    code, got, scontrol, out = run(sig.SIGUSR1, also_to_srun=False)
    assert got == ["USR1"] and scontrol == ["requeue", "77"] and code == 0, out
    code, got, scontrol, out = run(sig.SIGTERM, also_to_srun=True)
    assert got == ["TERM"] and scontrol == [] and code == 42, out
    assert "trainer exit code 42 (signals: TERM)" in out


def test_one_batch_script_runs_either_command(tmp_path):
    """slurm/pretrain.sbatch chooses dide-pretrain or dide-finetune by its first argument;
    slurm/finetune.sbatch, run as sbatch runs it (a copy in another folder), finds
    pretrain.sbatch through the job's record (scontrol's Command=) and runs it with
    ``finetune``.  A stand-in srun records the command it starts."""
    import shutil
    from pathlib import Path
    slurm_dir = Path(__file__).resolve().parents[1] / "slurm"
    bin_dir, spool = tmp_path / "bin", tmp_path / "spool"
    bin_dir.mkdir()
    spool.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\necho \"$@\" >> \"$STARTED\"\n")
    (bin_dir / "scontrol").write_text(  # only `show job -o 77` is asked before srun
        f"#!/bin/bash\n[ \"$3 $4\" = \"-o 77\" ] && echo 'JobId=77 Command={slurm_dir / 'finetune.sbatch'} W=x'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    shutil.copy(slurm_dir / "finetune.sbatch", spool / "slurm_script")

    def started(script, *args, **env):
        out = tmp_path / "started"
        out.unlink(missing_ok=True)
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="77", DIDE_MASTER_ADDR="node1",
                   STARTED=str(out), **env)
        run = subprocess.run(["bash", str(script), *args], env=env, cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout + run.stderr
        return out.read_text().split(" --unbuffered ")[-1].split()

    assert started(slurm_dir / "pretrain.sbatch", "debug", "a=1") == ["dide-pretrain", "--config", "debug", "a=1"]
    assert started(slurm_dir / "pretrain.sbatch", "finetune", "debug") == ["dide-finetune", "--config", "debug"]
    assert started(spool / "slurm_script", "debug", "a=1") == ["dide-finetune", "--config", "debug", "a=1"]
    assert started(slurm_dir / "pretrain.sbatch", "finetune", "debug", DIDE_CMD="my-trainer --x") == [
        "my-trainer", "--x", "--config", "debug"]


def test_submit_resources_follow_the_data_workers():
    from dide_scale.launch.submit import resources
    args = SimpleNamespace(cpus_per_task=None, mem_gb=None, gpus_per_node=8, tasks_per_node=None)
    assert resources(args, 8) == (10, 8 * 22.0)  # a rank + 8 workers + 1 spare; 8 ranks per node
    args.cpus_per_task, args.mem_gb = 4, 64.0
    assert resources(args, 8) == (4, 64.0)


# -- fp16 overflow is not a fault -------------------------------------------------------------

def test_only_truly_non_finite_steps_are_bad():
    from dide_scale.trainer import is_bad_step
    finite, nan = torch.tensor(2.5), torch.tensor(float("nan"))
    assert not is_bad_step(False, "fp16", nan)
    # fp16: dynamic loss scaling skips steps whose gradients overflowed at the current scale
    assert not is_bad_step(True, "fp16", finite)
    assert is_bad_step(True, "fp16", nan)
    # bf16 / fp32: DeepSpeed skips only on non-finite gradients
    assert is_bad_step(True, "bf16", finite) and is_bad_step(True, "fp32", finite)


# -- DeepSpeed dtypes and the teacher's sharding -----------------------------------------------

def test_reductions_and_accumulation_are_fp32_under_bf16():
    from dide_scale.engine import build_ds_config
    cfg = load_config("debug", ["train.precision=bf16", "train.zero_stage=2"])
    ds = build_ds_config(cfg, 1)
    assert ds["communication_data_type"] == "fp32" and ds["data_types"]["grad_accum_dtype"] == "fp32"
    ds = build_ds_config(load_config("debug", ["train.precision=bf16", "train.comm_dtype=bf16"]), 1)
    assert ds["communication_data_type"] == "bf16"
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"  # ZeRO-1 too (it was left in bf16)
    # ZeRO-0 cannot accumulate in fp32: refused when it would accumulate, naming the ways out
    with pytest.raises(ConfigError, match="train.zero_stage=1, or train.grad_accum_dtype=bf16"):
        build_ds_config(load_config("debug", ["train.precision=bf16", "train.zero_stage=0"]), 1)
    one = load_config("debug", ["train.precision=bf16", "train.zero_stage=0", "train.global_batch_size=8"])
    assert "data_types" not in build_ds_config(one, 1)  # one micro-batch per step: nothing accumulates
    assert "communication_data_type" not in build_ds_config(load_config("debug"), 1)  # fp32: nothing to say
    with pytest.raises(ConfigError, match="train.comm_dtype"):
        load_config("debug", ["train.comm_dtype=fp8"])
    with pytest.raises(ConfigError, match="teacher.zero_stage"):
        load_config("debug", ["teacher.zero_stage=2"])
    assert load_config("debug", ["train.zero_stage=2", "teacher.zero_stage=3"]).teacher_partitioned()
    assert not load_config("debug", ["train.zero_stage=2"]).teacher_partitioned()
    assert load_config("debug", ["train.zero_stage=3"]).teacher_partitioned()


# -- the run-directory lease ------------------------------------------------------------------

def _foreign_lease(run, host, pid, renewed_ago, ttl=300.0, job=None):
    now = time.time()
    run.mkdir(parents=True, exist_ok=True)
    (run / LEASE).write_text(json.dumps({"token": "other", "host": host, "pid": pid, "slurm_job_id": job,
                                         "since": now - 3600, "renewed": now - renewed_ago, "ttl_s": ttl}))


def test_lease_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    a = RunLease(run, ttl_s=60).acquire()
    with pytest.raises(LeaseHeld, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
        RunLease(run, ttl_s=60).acquire()
    a.release()
    assert not (run / LEASE).exists()
    b = RunLease(run, ttl_s=60).acquire()  # free again
    b.renew()
    assert json.loads((run / LEASE).read_text())["token"] == b.me.token
    b.release()
    # another node, renewed 10 s ago: held; renewed 10 min ago with a 5 min TTL: stale
    _foreign_lease(run, "node7", 4321, 10, job="991")
    with pytest.raises(LeaseHeld, match="host node7, pid 4321, SLURM job 991"):
        RunLease(run).acquire()
    _foreign_lease(run, "node7", 4321, 600)
    c = RunLease(run).acquire()
    assert "not renewed for 600 s" in c.took_over
    c.release()
    # this host, a pid that no longer exists: taken over at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _foreign_lease(run, socket.gethostname(), dead.pid, 1)
    d = RunLease(run).acquire()
    assert f"process {dead.pid} on this host is gone" in d.took_over
    d.release()
    # the same SLURM job after a requeue takes its own lease over, even a fresh one
    _foreign_lease(run, "node7", 4321, 1, job="991")
    monkeypatch.setenv("SLURM_JOB_ID", "991")
    e = RunLease(run).acquire()
    assert "same SLURM job 991" in e.took_over
    e.release()


@pytest.mark.slow
def test_a_second_job_on_a_held_directory_is_refused_and_a_killed_holder_is_taken_over(demo_shards, tmp_path):
    """A real job holds the directory; an identical second command exits non-zero at once,
    naming it; after the first is SIGKILLed (no release), the next one takes over and resumes."""
    run = tmp_path / "run"

    def command(steps):
        return [sys.executable, "-m", "dide_scale.train", "--config", "debug", *tiny_overrides(demo_shards, run, **{
            "train.max_steps": steps, "train.save_every": 2, "train.log_every": 1, "data.val_shards": ""})]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    first = subprocess.Popen(command(100_000), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "latest").exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.1)
        t0 = time.time()
        second = subprocess.run(command(100_000), env=env, capture_output=True, text=True, timeout=300)
        refused_s = time.time() - t0
        assert second.returncode == 2
        assert f"in use by another job (host {socket.gethostname()}, pid {first.pid}" in second.stderr
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.kill()
        first.wait()
    assert (run / LEASE).exists()  # SIGKILL: never released
    step = int((run / "checkpoints" / "latest").read_text()[5:])
    third = subprocess.run(command(step + 2), env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    log = (run / "logs" / "rank000.log").read_text()
    assert f"process {first.pid} on this host is gone" in log and f"resuming at step {step}" in log
    assert not (run / LEASE).exists()  # released at the end
    record("second_job_refused", seconds_to_refuse=round(refused_s, 2), holder_undisturbed=True)
    record("stale_lease_taken_over", holder="SIGKILLed", resumed_from=step)


def test_a_job_that_loses_its_lease_stops_writing_at_once(demo_shards, tmp_path, monkeypatch):
    """During step 3 another job takes the lease over (this one's renewals had stalled past the
    TTL, as on a hung filesystem): the run stops before its step-3 checkpoint with exit code 4,
    writes nothing more and leaves the other job's lease alone.  Before, it only logged it and
    went on checkpointing into a directory another job owned."""
    from dide_scale import trainer
    from dide_scale.train import main
    run = tmp_path / "run"
    real = trainer.train_step

    def train_step(engines, objective, batches, accum, timed, key=(0, 0, 0)):
        out = real(engines, objective, batches, accum, timed, key)
        if key[2] == 2:
            _foreign_lease(run, "node7", 4321, 0)
            log = run / "logs" / "rank000.log"
            deadline = time.time() + 60  # the renewal thread (every ttl/3 = 0.5 s) finds it
            while "lease was taken by another job" not in log.read_text() and time.time() < deadline:
                time.sleep(0.05)
        return out
    monkeypatch.setattr(trainer, "train_step", train_step)
    code = main(["--config", "debug", *tiny_overrides(demo_shards, run, **{
        "train.max_steps": 6, "train.save_every": 1, "train.lease_ttl_s": 1.5})])
    assert code == trainer.LEASE_LOST_EXIT_CODE
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    assert json.loads((run / LEASE).read_text())["token"] == "other"  # not released: it is not ours
    assert not (run / "summary.json").exists()
    assert "stopping without writing anything more" in (run / "logs" / "rank000.log").read_text()
    record("lease_lost", exit_code=code, last_checkpoint="step_00000002", checkpoints_after_loss=0)


# -- a step's randomness is a function of its key ---------------------------------------------

def test_a_steps_random_draws_depend_only_on_its_key():
    """ITM negatives (the dual encoder's mining, a fusion student's random rows) and dropout /
    drop-path inside ``step_rng`` are the same for the same (seed, rank, step, micro-step)
    whatever the global RNG did before (a new DataLoader iterator, an evaluation, a probe), and
    the global RNG is left as it was."""
    from dide_scale.config import LossConfig
    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.images import images_from_pixels
    from dide_scale.models.student import DualEncoder, TowerShape
    from dide_scale.objective import DistillObjective
    from dide_scale.rng import step_rng, step_seed
    shape = TowerShape(width=16, depth=2, heads=2, patch_size=8, image_size=[16, 16], max_text_len=8, vocab_size=50,
                       drop_path=0.3)
    torch.manual_seed(0)
    b = {"images": images_from_pixels(torch.rand(6, 3, 16, 16), 8), "input_ids": torch.randint(5, 50, (6, 8)),
         "attention_mask": torch.ones(6, 8, dtype=torch.long)}
    for model in (DualEncoder(shape, "itm", 2), FusionEncoder(shape, "itm", 2)):
        obj = DistillObjective(model, None, LossConfig(attn_t2i=0, attn_i2t=0, soft_label=0, ground_truth=1.0), "itm")
        obj.train()
        losses = []
        for noise in (0, 5, 1000):
            torch.rand(noise)  # the global RNG somewhere else
            before = torch.get_rng_state()
            with step_rng(step_seed(7, 1, 42, 0), torch.device("cpu")) as gen:
                losses.append(obj.training_forward(b, generator=gen).loss.item())
            assert torch.equal(torch.get_rng_state(), before)
        assert losses[0] == losses[1] == losses[2]
        with step_rng(step_seed(7, 1, 43, 0), torch.device("cpu")) as gen:
            assert obj.training_forward(b, generator=gen).loss.item() != losses[0]  # another step draws anew
    assert len({step_seed(0, r, s, m) for r in range(4) for s in range(50) for m in range(3)}) == 600
