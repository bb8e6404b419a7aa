"""``dide-submit``: the training job through submitit, on SLURM or on this machine.

    dide-submit --cluster slurm --nodes 2 --gpus-per-node 8 --time 240 --partition gpu \\
        --config pretrain_b32 train.output_dir=/shared/runs/b32

One submitit task per GPU (SLURM: srun tasks; local: processes), each running the trainer
behind ``dide-pretrain`` (fine-tuning configs, ``train.task=vqa|nlvr2|snli_ve``, run the same
way).  Preemption and the time-limit warning:

* submitit asks SLURM for its warning signal (``SIGUSR2``, ``--signal-delay`` seconds before
  the time limit) on every task.  Submitit's own handler would checkpoint on rank 0 only
  and exit there at once; a ZeRO checkpoint needs every rank, so :class:`TrainJob` routes
  the signal to the trainer's ``StopSignal`` (which also takes SIGTERM and SIGUSR1) on
  every rank instead.  The ranks agree at the next step boundary, save a sharded
  checkpoint together and return ``REQUEUE_EXIT_CODE``.
* After a warning (USR2/USR1), rank 0 hands over to submitit's requeue path
  (``checkpoint()`` -> a ``DelayedSubmission`` of the same job, dumped; ``scontrol
  requeue``, or the local executor's restart code).  The other ranks wait until rank 0 has
  asked for the requeue and exit with code 0: with ``KillOnBadExit`` a non-zero exit would
  let srun kill rank 0 first.  After a SIGTERM (preemption,
  ``scancel``, ``scontrol requeue``) SLURM decides whether the job comes back.  Either way
  no task writes a result, so a requeued job writes them when it finishes; it resumes from
  the checkpoint: the state lives in ``train.output_dir``, never in the pickle.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from .. import distributed
from ..config import ConfigError, load_config
from ..configdoc import print_config as describe
from ..configdoc import shipped_configs_help
from ..console import add_version, quiet_libraries
from ..lease import LeaseHeld, RunLease
from ..rundir import move_aside

# SBATCH_* variables that sbatch itself reads would silently win over the script submitit
# writes: the first four are our defaults instead, and all are removed before submitting.
SBATCH_OVERRIDING = ("SBATCH_PARTITION", "SBATCH_ACCOUNT", "SBATCH_QOS", "SBATCH_TIMELIMIT", "SBATCH_SIGNAL",
                     "SBATCH_NO_REQUEUE", "SBATCH_OPEN_MODE")


def minutes(limit: str) -> int:
    """A SLURM time limit ('90', '1:30:00', '2-00:00:00', 'MM:SS') in whole minutes."""
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        parts += [0] * (3 - len(parts))
        h, m, sec = parts
        h += 24 * int(days)
    elif len(parts) == 3:
        h, m, sec = parts
    elif len(parts) == 2:
        h, (m, sec) = 0, parts
    else:
        h, m, sec = 0, parts[0], 0
    return max(1, 60 * h + m + (sec + 59) // 60)


def gpu_count(spec: str | None) -> int:
    """'4' or 'a100:4' (SBATCH_GPUS_PER_NODE) -> 4."""
    try:
        return int((spec or "0").rsplit(":", 1)[-1])
    except ValueError:
        return 0


def _submitit_signal() -> int:
    """Submitit's warning signal (SIGUSR2 unless $SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    import submitit
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG, signal.SIGUSR2)


class _ToTrainer:
    """Routes submitit's warning signal to the trainer's ``StopSignal`` on every rank.

    The trainer installs ``StopSignal`` for SIGTERM and SIGUSR1 when it starts; the
    submitit signal is passed to whatever handles SIGUSR1 at that moment.  Before the
    trainer is up a signal is only recorded (SIGUSR1's default action would kill the rank;
    nothing has been trained yet, so nothing is lost)."""

    def __init__(self, sub_sig: int):
        self.sub_sig = sub_sig
        self.last: int | None = None

    def install(self) -> None:
        for sig in {signal.SIGUSR1, self.sub_sig}:
            signal.signal(sig, self.handler)

    def handler(self, signum, frame) -> None:
        self.last = signum
        current = signal.getsignal(signal.SIGUSR1)
        if callable(current) and getattr(current, "__self__", None) is not self:
            current(signum, frame)


def _trainer_stop_signal() -> int | None:
    """The last stop signal the trainer's ``StopSignal`` recorded (its handlers stay
    installed after ``main`` returns)."""
    owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return getattr(owner, "received", None)


def _trainer_terminated() -> bool:
    """Whether the trainer's ``StopSignal`` saw a SIGTERM at any point (a warning signal that
    came after it does not make it a warning)."""
    owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return bool(getattr(owner, "terminated", False))


def _export_local_ranks(env, port: int) -> None:
    """The local executor's tasks as torchrun-style variables (SLURM tasks are srun steps,
    which distributed.detect reads directly)."""
    os.environ.update(RANK=str(env.global_rank), LOCAL_RANK=str(env.local_rank), WORLD_SIZE=str(env.num_tasks),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_SIZE=str(env.num_tasks))


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # submitit is a dependency; keep the module importable for --help anyway
    _Checkpointable = object


class TrainJob(_Checkpointable):
    """The submitit callable: ``dide-pretrain``'s main() on every task; requeue on exit 42."""

    def __init__(self, config: str, overrides: list[str], run_dir: str, local_port: int | None = None):
        self.config = config
        self.overrides = list(overrides)
        self.run_dir = str(run_dir)
        self.local_port = local_port

    def __call__(self) -> dict:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch starts its threads (the local executor)
        import submitit

        from .. import train
        started = time.time()
        router = _ToTrainer(_submitit_signal())
        router.install()  # replaces submitit's handler, which would checkpoint and exit on rank 0 only
        env = submitit.JobEnvironment()
        if env.cluster != "slurm" and env.num_tasks > 1:
            _export_local_ranks(env, self.local_port or 29500)
        code = train.main(["--config", self.config, *self.overrides])
        if code == train.REQUEUE_EXIT_CODE:
            last = _trainer_stop_signal() or router.last or signal.SIGUSR1
            if last == signal.SIGTERM or _trainer_terminated():
                # SLURM is ending the job (preemption, scancel, scontrol requeue, time limit):
                # requeueing is SLURM's decision (a cancelled job must stay cancelled).  No
                # result from any task: a requeued job writes them when it finishes.
                sys.exit(train.REQUEUE_EXIT_CODE)
            self._requeue(env, last, started)
        if code != 0:
            raise RuntimeError(f"the trainer exited with code {code}; see {self.run_dir}/logs")
        return json.loads((Path(self.run_dir) / "summary.json").read_text())

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 only, after the trainer saved the sharded checkpoint
        on every rank: the resubmission is this same job, which resumes from its run dir."""
        from submitit.helpers import DelayedSubmission
        return DelayedSubmission(TrainJob(self.config, self.overrides, self.run_dir, self.local_port),
                                 *args, **kwargs)

    @staticmethod
    def _requeue(env, signum: int, started: float) -> None:
        """Submitit's own preemption path, entered after every rank has checkpointed.  As in
        submitit, a stop late in the time limit counts as a time-out (at most
        ``--max-timeouts`` of those); a preemption does not count."""
        marker = Path(env.paths.folder) / f"{env.job_id}.requeue-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        if env.global_rank != 0:
            # Exit cleanly, and only once rank 0 has asked for the requeue: a non-zero exit
            # here would let srun (KillOnBadExit) kill rank 0 before it requeues, and the job
            # would never come back.  No result file from this task: the requeued job writes
            # it (SystemExit is not caught by submitit).
            deadline = time.time() + 120
            while not marker.exists() and time.time() < deadline:
                time.sleep(0.2)
            sys.exit(0)
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission
        delayed = DelayedSubmission.load(env.paths.submitted_pickle)
        handler = SignalHandler(env, env.paths, delayed)
        handler._start_time = started  # the job's start, not now: time-out vs preemption
        try:  # -> self.checkpoint(), dump, `scontrol requeue` (slurm) / exit 144 (local), sys.exit
            handler.checkpoint_and_try_requeue(signum)
        finally:
            marker.write_text("requeue requested\n")


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    ap = argparse.ArgumentParser(
        prog="dide-submit", description="Submit dide training through submitit (SLURM or this machine).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults come from SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_QOS, SBATCH_TIMELIMIT,\n"
               "SBATCH_GPUS_PER_NODE, DIDE_ENV_SETUP, DIDE_SRUN_ARGS.  See docs/CLUSTER.md.\n\n"
               + shipped_configs_help())
    ap.add_argument("--config", default="debug",
                    help="YAML file or shipped config name (default: debug; see below)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    ap.add_argument("--cluster", choices=("auto", "slurm", "local"), default="auto",
                    help="slurm, local (processes on this machine) or auto (slurm when srun exists)")
    ap.add_argument("--nodes", type=int, default=1, help="nodes (default: 1)")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="GPUs per node (default: $SBATCH_GPUS_PER_NODE, applied by sbatch itself, or 0)")
    ap.add_argument("--tasks-per-node", type=int, default=None,
                    help="ranks per node (default: one per GPU, or 1 without GPUs)")
    ap.add_argument("--cpus-per-task", type=int, default=None,
                    help="CPUs per rank (default: data.num_workers + 2: the rank, its data workers, one spare)")
    ap.add_argument("--mem-gb", type=float, default=None,
                    help="memory per node in GB (default: ranks per node x (6 + 2 x data.num_workers))")
    ap.add_argument("--time", type=int, default=minutes(env("SBATCH_TIMELIMIT") or "60"),
                    help="time limit in minutes (default: $SBATCH_TIMELIMIT or 60)")
    ap.add_argument("--partition", default=env("SBATCH_PARTITION"), help="(default: $SBATCH_PARTITION)")
    ap.add_argument("--account", default=env("SBATCH_ACCOUNT"), help="(default: $SBATCH_ACCOUNT)")
    ap.add_argument("--qos", default=env("SBATCH_QOS"), help="(default: $SBATCH_QOS)")
    ap.add_argument("--exclusive", action="store_true", help="whole nodes")
    ap.add_argument("--signal-delay", type=int, default=120,
                    help="seconds between the warning signal and the time limit (default: 120)")
    ap.add_argument("--max-timeouts", type=int, default=20,
                    help="requeues after reaching the time limit before giving up (preemptions are not counted; "
                         "default: 20)")
    ap.add_argument("--setup", action="append", default=None,
                    help="shell line run before srun (repeatable; default: $DIDE_ENV_SETUP)")
    ap.add_argument("--srun-args", default=env("DIDE_SRUN_ARGS", ""),
                    help="extra srun flags, one string (default: $DIDE_SRUN_ARGS)")
    ap.add_argument("--python", default=None, help="python in the job (default: this interpreter)")
    ap.add_argument("--name", default="dide", help="job name (default: dide)")
    ap.add_argument("--folder", default=None,
                    help="submitit folder: pickles and per-task logs (default: <train.output_dir>/submitit)")
    ap.add_argument("--wait", action="store_true", help="wait for the job and print rank 0's summary")
    ap.add_argument("--start-over", action="store_true",
                    help="move an earlier run in train.output_dir aside (into its superseded/ folder) now, before "
                         "submitting, so the job starts from step 0; without it the job resumes, and a changed model "
                         "shape or task is refused")
    ap.add_argument("--print-config", action="store_true",
                    help="print every key with its value (after --config and the overrides, at the job's world size) "
                         "and its meaning, as YAML that --config takes back, and exit without submitting")
    ap.add_argument("--skip-preflight", action="store_true",
                    help="submit without first checking shards, teacher, initialisation, tokenizer and run directory "
                         "from this host (for data only the compute nodes can see)")
    add_version(ap)
    return ap


def check_before_submitting(args, world: int):
    """The trainer's own pre-start checks, here, so a job that would fail at once is never
    queued; with --start-over the earlier run is moved aside now (holding the directory's
    lease, so a live job there is refused), not in the job: a requeued job must resume.
    Returns the config; raises with one line."""
    from .. import train
    cfg = load_config(args.config, args.overrides, world_size=world)
    cfg.grad_accum_steps(world)
    if not args.skip_preflight:
        train.preflight(cfg, world, start_over=args.start_over)
    for warning in train.config_warnings(cfg):
        print(f"dide-submit: warning: {warning}", file=sys.stderr)
    if args.start_over:
        lease = RunLease(cfg.train.output_dir, cfg.train.lease_ttl_s).acquire()
        try:
            moved = move_aside(cfg.train.output_dir)
        finally:
            lease.release()
        if moved:
            print(f"started over: the earlier run was moved aside into {moved}")
    return cfg


def print_config(args, world: int) -> int:
    """--print-config: the job's config, resolved here as the job will resolve it."""
    cfg = load_config(args.config, args.overrides, world_size=world)
    print(describe(cfg, " ".join(["dide-submit", "--config", args.config, *args.overrides])), end="")
    return 0


def submit_quietly(ex, job_fn):
    """``ex.submit``, with a refused submission (sbatch's error, which submitit also prints
    and wraps in a traceback) raised as one line."""
    import contextlib
    import io

    from submitit.core.utils import FailedJobError, FailedSubmissionError
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            job = ex.submit(job_fn)
    except (FailedJobError, FailedSubmissionError, OSError) as e:
        text = (str(e).strip() or err.getvalue().strip() or e.__class__.__name__).splitlines()
        raise RuntimeError(f"the job was not submitted: {' / '.join(line.strip() for line in text[-3:])}") from None
    sys.stderr.write(err.getvalue())
    return job


def tasks_per_node(args) -> int:
    gpus = args.gpus_per_node if args.gpus_per_node is not None else gpu_count(os.environ.get("SBATCH_GPUS_PER_NODE"))
    return args.tasks_per_node or max(gpus, 1)


def resources(args, num_workers: int) -> tuple[int, float]:
    """(CPUs per task, memory in GB per node): a rank needs a core for itself, one per
    data-loader worker, and one for pinning and the communication threads; memory grows
    with the workers' prefetched batches.  --cpus-per-task / --mem-gb override."""
    cpus = args.cpus_per_task or num_workers + 2
    mem = args.mem_gb if args.mem_gb is not None else tasks_per_node(args) * (6.0 + 2.0 * num_workers)
    return cpus, mem


# one CPU thread per rank unless the environment says otherwise (what torchrun and the sbatch
# scripts do): the GPU does the work, and the cores go to the data-loader workers
OMP_SETUP = "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}"


def srun_args(extra: str | None) -> list[str]:
    """The srun flags of the job: ``--kill-on-bad-exit=1`` (one crashed rank ends the step at
    once instead of leaving every other GPU in a collective until its timeout) unless the
    user's own flags (``--srun-args``) say otherwise, then theirs."""
    given = shlex.split(extra or "")
    if any(a == "-K" or a.startswith(("--kill-on-bad-exit", "-K")) for a in given):
        return given
    return ["--kill-on-bad-exit=1", *given]


def make_executor(args, folder: str, num_workers: int = 0):
    import submitit
    cluster = None if args.cluster == "auto" else args.cluster
    kw = {"slurm_max_num_timeout": args.max_timeouts, "local_max_num_timeout": args.max_timeouts}
    if args.python:
        kw.update(slurm_python=args.python, local_python=args.python)
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, **kw)
    cpus, mem = resources(args, num_workers)
    params = dict(name=args.name, timeout_min=args.time, nodes=args.nodes, tasks_per_node=tasks_per_node(args),
                  cpus_per_task=cpus, mem_gb=mem)
    if ex.cluster == "slurm":
        if args.gpus_per_node is not None:  # else sbatch applies $SBATCH_GPUS_PER_NODE (type included) itself
            os.environ.pop("SBATCH_GPUS_PER_NODE", None)
            params["gpus_per_node"] = args.gpus_per_node or None
        setup = args.setup if args.setup is not None else [s for s in [os.environ.get("DIDE_ENV_SETUP")] if s]
        setup = [*setup, OMP_SETUP]
        extra = {"requeue": True}
        if args.exclusive:
            extra["exclusive"] = True
        params.update(slurm_partition=args.partition, slurm_account=args.account, slurm_qos=args.qos,
                      slurm_signal_delay_s=args.signal_delay, slurm_setup=setup,
                      slurm_srun_args=srun_args(args.srun_args), slurm_additional_parameters=extra)
        for var in SBATCH_OVERRIDING:
            os.environ.pop(var, None)
    else:
        if args.nodes != 1:
            raise SystemExit(f"dide-submit: error: --cluster {ex.cluster} runs on one node (got --nodes {args.nodes})")
        params["gpus_per_node"] = gpu_count(str(args.gpus_per_node)) if args.gpus_per_node is not None \
            else gpu_count(os.environ.get("SBATCH_GPUS_PER_NODE"))
        # (the local executor sends its warning signal 30 s before --time; not configurable)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    world = args.nodes * tasks_per_node(args)
    try:  # fail here, not in the queue: bad keys, batch arithmetic for this world size, the preflight
        if args.print_config:
            return print_config(args, world)
        cfg = check_before_submitting(args, world)
    except (ConfigError, FileNotFoundError, LeaseHeld, RuntimeError, ValueError) as e:
        print(f"dide-submit: error: {e}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.train.output_dir).resolve()
    config = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config
    overrides = [*args.overrides, f"train.output_dir={run_dir}"]  # the job's cwd may differ
    try:
        ex = make_executor(args, args.folder or str(run_dir / "submitit"), cfg.data.num_workers)
        port = distributed.free_port() if ex.cluster != "slurm" else None
        job = submit_quietly(ex, TrainJob(config, overrides, str(run_dir), port))
    except RuntimeError as e:
        print(f"dide-submit: error: {e}", file=sys.stderr)
        return 2
    cpus, mem = resources(args, cfg.data.num_workers)
    print(f"submitted {ex.cluster} job {job.job_id}: {world} rank(s) on {args.nodes} node(s), {cpus} CPUs per rank, "
          f"{mem:g} GB per node\n"
          f"  run dir: {run_dir}\n  logs:    {job.paths.folder}/{job.job_id}_<rank>_log.out|err", flush=True)
    if not args.wait:
        return 0
    try:
        results = job.results()  # one per task, each the run's summary
    except Exception as e:  # FailedJobError / UncompletedJobError carry the job's log tail
        print(f"job {job.job_id} failed: {e}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished: {results[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
