"""``dide-pretrain``: distillation training (pre-training ITM, or a fine-tuning task).

    dide-pretrain --config debug [key=value ...]

Runs as one process, under ``torchrun``/``deepspeed`` or under ``srun``.  Re-running the
same command on the same ``train.output_dir`` resumes from the newest intact checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from . import distributed
from .config import ConfigError, RunConfig, load_config
from .configdoc import print_config, shipped_configs_help
from .console import add_version, quiet_libraries
from .distributed import REQUEUE_EXIT_CODE
from .lease import LeaseHeld, RunLease
from .models.sources import resolve_source, split_init
from .rundir import RunDirMismatch, changed_settings, move_aside, reuse_problem

log = logging.getLogger("dide_scale")
__all__ = ["REQUEUE_EXIT_CODE", "StopSignal", "cli", "main", "preflight", "run", "step_exit_code"]
# how long rank 0 of an srun step waits for the other ranks to be gone before it exits 42
STEP_EXIT_GRACE_S = 5.0


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's time-limit warning and preemption) set a flag; the loop
    agrees on it across ranks at a step boundary and checkpoints.  ``terminated``: a SIGTERM
    came at some point (SLURM is ending the step, whatever arrived after it)."""

    def __init__(self):
        self.received: int | None = None
        self.terminated = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.received = signum
        self.terminated = self.terminated or signum == signal.SIGTERM


def run(cfg: RunConfig, env: distributed.DistEnv, ds_config: dict, stop: StopSignal | None = None,
        start_over: bool = False) -> dict:
    """Hold the run directory's lease, then build the :class:`~dide_scale.trainer.Trainer` and
    fit.  Returns its summary.  Raises, on every rank, ``RunDirMismatch`` when the directory
    holds a run of another model shape or task (before anything is written; ``start_over``
    moves that run aside instead) and ``LeaseHeld`` when another job holds the directory."""
    from . import engine as eng_mod
    eng_mod.init_distributed(env, cfg.train.collective_timeout_s)
    threads = cpu_threads(cfg, env)
    control = distributed.control_group(cfg.train.collective_timeout_s) if env.world_size > 1 else None
    run_dir = Path(cfg.train.output_dir)
    refused = distributed.rank0_decides(reuse_problem(cfg) if env.is_main and not start_over else None, control)
    if refused:
        raise RunDirMismatch(refused)
    lease = hold_lease(run_dir, cfg.train.lease_ttl_s, env.is_main, control)
    try:
        from .metrics import setup_logging
        from .trainer import Trainer
        moved = distributed.rank0_decides(move_aside(run_dir) if env.is_main and start_over else None, control)
        changed = changed_settings(cfg) if env.is_main else []  # before the trainer records the new config
        setup_logging(env.rank, cfg.train.output_dir)
        if lease is not None and lease.took_over:
            log.warning("took the run directory's lease over from %s", lease.took_over)
        if moved:
            log.warning("started over: the earlier run in %s was moved aside into %s", run_dir, moved)
        if changed:
            log.info("the directory's checkpoints were written with other settings; resuming with the new ones: %s",
                     "; ".join(changed))
        for warning in config_warnings(cfg):
            log.warning(warning)
        if threads:
            log.info("torch uses %d CPU thread(s): the cores less the %d data-loader worker(s) "
                     "(set OMP_NUM_THREADS to choose)", threads, cfg.data.num_workers)
        summary = Trainer(cfg, env, ds_config, stop or StopSignal(), control, lease).fit()
        if env.is_main:
            log_outputs(cfg, summary)
        return summary
    finally:
        if lease is not None:
            lease.release()


def cpu_threads(cfg: RunConfig, env: distributed.DistEnv) -> int | None:
    """A one-process run on the CPU: torch's threads would take every core and the data-loader
    workers would then compete with them (on 2 cores, 2 threads + 1 worker made each demo step
    1.7x as long as 1 thread + 1 worker).  Leaves the cores the workers need; nothing when
    OMP_NUM_THREADS is set, on a GPU, or with several ranks (their launchers set threads)."""
    import torch
    if "OMP_NUM_THREADS" in os.environ or env.world_size > 1 or torch.cuda.is_available():
        return None
    threads = max(1, len(os.sched_getaffinity(0)) - cfg.data.num_workers)
    torch.set_num_threads(threads)
    return threads


def config_warnings(cfg: RunConfig) -> list[str]:
    """Settings that are valid but probably not what was meant."""
    out = []
    if cfg.teacher.path and not cfg.loss.distills():
        out.append(f"teacher.path={cfg.teacher.path} is set but every distillation loss is 0 (loss.attn_t2i, "
                   "loss.attn_i2t, loss.soft_label, loss.attn_mse, loss.token_nce): the teacher is not used")
    return out


def log_outputs(cfg: RunConfig, summary: dict) -> None:
    """Where a finished run's models went."""
    if summary.get("exit_code") or "export" not in summary:
        return
    where = f"the final weights (step {summary['step']}) are in {summary['export']}"
    best, best_dir = summary.get("best"), Path(cfg.train.output_dir) / "best"
    if best and (best_dir / "config.json").exists():
        metric = "mean R@1" if cfg.train.task == "itm" else "accuracy"
        where += (f", the best on the dev split ({metric} {best['accuracy']:.4f} at step {best['step']}) "
                  f"in {best_dir}")
    log.info("done: %s; evaluate one with `dide-eval --model DIR --shards ...`, or load it with "
             "dide_scale.inference.Predictor.from_pretrained(DIR)", where)


def hold_lease(run_dir: Path, ttl_s: float, is_main: bool, control):
    """Rank 0 takes the run directory's lease; every rank learns the verdict."""
    lease, refused = None, None
    if is_main:
        try:
            lease = RunLease(run_dir, ttl_s).acquire()
        except LeaseHeld as e:
            refused = str(e)
    refused = distributed.rank0_decides(refused, control)
    if refused:
        raise LeaseHeld(refused)
    return lease


def preflight(cfg: RunConfig, world_size: int = 1, start_over: bool = False) -> None:
    """Everything that can be checked before a process group exists: shards (local ones
    must be files, a remote source's first shard must answer; epoch mode needs sample counts
    and enough of them for every stream), the teacher's files, the student's initialisation
    files, the tokenizer (Hub ids resolved to local snapshots on the way), and the run
    directory (a run of another model shape or task there is refused unless ``start_over``)."""
    from .data.pipeline import check_streams
    from .data.transforms import load_tokenizer
    check_streams(shard_sources(cfg, "data.train_shards"), cfg, world_size)
    if cfg.data.val_shards:
        val = shard_sources(cfg, "data.val_shards")
        check_streams(val, cfg, world_size, train=False)
        shards = sum(len(s.urls) for s in val)
        if cfg.train.task == "itm" and cfg.train.zero_stage == 3 and cfg.student.kind == "dual" and shards < world_size:
            raise ValueError(f"data.val_shards has {shards} shard(s) for {world_size} ranks: at ZeRO-3 the retrieval "
                             "evaluation runs the ranks in lock-step and each needs a shard of its own; write the "
                             "split in at least as many shards as ranks (dide-data ... --samples-per-shard)")
    if cfg.loss.distills():
        check_teacher_files(cfg)
        from .build import check_heads, teacher_shape
        check_heads(teacher_shape(cfg)[1], cfg)
        from .labels import label_map_for
        label_map_for(cfg)  # label names that cannot be matched are refused here, with the numbers
        if cfg.teacher.kind == "hf_vilt":
            from .models.hf_vilt import preprocessing_differences
            for problem in preprocessing_differences(resolve_source(cfg.teacher.path, "teacher.path"), cfg.data):
                log.warning("the teacher's own preprocessing differs from the data path: %s", problem)
    if cfg.train.task == "caption" and cfg.data.val_shards:
        check_java()
    check_init_files(cfg.student.init)
    load_tokenizer(cfg.data.tokenizer)
    problem = None if start_over else reuse_problem(cfg)
    if problem:
        raise RunDirMismatch(problem)
    if cfg.train.task == "vqa":
        from .labels import answer_list
        answer_list(cfg)  # the answers exist (data.answer_vocab) and number data.num_answers


def check_java() -> None:
    """Caption evaluation scores with the COCO tools, whose tokenizer and METEOR are Java."""
    import shutil
    if shutil.which("java") is None:
        from .captions import JAVA_HINT
        raise RuntimeError(f"data.val_shards is set for train.task=caption, but no `java` is on PATH: {JAVA_HINT}")


def check_teacher_files(cfg) -> None:
    """teacher.path holds what teacher.kind reads (a Hub id is fetched to its snapshot first)."""
    from .models.saved import read_model_config
    kind = cfg.teacher.kind
    try:
        path = resolve_source(cfg.teacher.path, "teacher.path")
        if kind == "vilt_ckpt":
            from .models.vilt_native import ViltCheckpoint, task_head
            if Path(path).is_dir():
                raise ValueError(f"{path} is a directory, but teacher.kind=vilt_ckpt reads a checkpoint file of "
                                 "dandelin/ViLT's release (.ckpt); a transformers ViLT directory is "
                                 "teacher.kind=hf_vilt")
            task_head(ViltCheckpoint.read(path), cfg.train.task, cfg.teacher.itm_head)
        elif Path(path).is_file():
            raise ValueError(f"{path} is a file, but teacher.kind={kind} reads a model directory; a checkpoint of "
                             "dandelin/ViLT's release (.ckpt) is teacher.kind=vilt_ckpt")
        else:
            read_model_config(path, ("vilt",) if kind == "hf_vilt" else ("dide_fusion",))
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(_keyed("teacher.path", e)) from None


def check_init_files(spec: str) -> None:
    """student.init names files of the kind it says (a Hub id is fetched to its snapshot first)."""
    from .models.saved import read_model_config
    kind = spec.partition(":")[0]
    if kind not in ("vilt", "fusion", "export"):
        return
    try:
        _, path = split_init(spec)
        if kind == "vilt" and Path(path).is_file():
            from .models.vilt_native import ViltCheckpoint
            ViltCheckpoint.read(path)
            return
        expected = {"vilt": ("vilt",), "fusion": ("dide_fusion",), "export": ("dide_dual_encoder", "dide_fusion")}
        read_model_config(path, expected[kind])
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(_keyed("student.init", e)) from None


def _keyed(key: str, e: Exception) -> str:
    return str(e) if str(e).startswith(key) else f"{key}: {e}"


# where the shipped debug config reads its shards from, and the command that writes them
DEMO_DATA, DEMO_DATA_COMMAND = "runs/demo_data", "dide-data demo --out runs/demo_data"


def shard_sources(cfg: RunConfig, key: str):
    """The sources of ``data.train_shards`` / ``data.val_shards``; a problem is raised in one
    line naming the key (and, for the demo shards the debug config reads, the command that
    writes them)."""
    from .data.pipeline import expand_sources
    train = key == "data.train_shards"
    spec, weights = (cfg.data.train_shards, cfg.data.train_weights or None) if train else (cfg.data.val_shards, None)
    try:
        return expand_sources(spec, weights)
    except (FileNotFoundError, ValueError) as e:
        msg = _keyed(key, e)
        if isinstance(e, FileNotFoundError) and f"{DEMO_DATA}/" in spec and not os.path.isdir(DEMO_DATA):
            msg += f" (write the demo shards first: `{DEMO_DATA_COMMAND}`)"
        raise type(e)(msg) from None


def command_description(doc: str | None) -> str:
    """A module docstring's first paragraph as --help's description."""
    return (doc or "").split("\n\n")[0].replace("``", "")


def parse_args(argv: list[str] | None, prog: str = "dide-pretrain", description: str | None = None):
    ap = argparse.ArgumentParser(prog=prog, description=description or command_description(__doc__),
                                 epilog=shipped_configs_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="debug", help="YAML file or shipped config name (default: debug; see below)")
    ap.add_argument("--print-config", action="store_true",
                    help="print every key with its value (after --config and the overrides) and its meaning, "
                         "as YAML that --config takes back, and exit")
    ap.add_argument("--start-over", action="store_true",
                    help="move an earlier run in train.output_dir aside (into its superseded/ folder) and start "
                         "from step 0; without it the run resumes, and a changed model shape or task is refused")
    add_version(ap)
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    return ap.parse_args(argv)


def requeued(environ=os.environ) -> bool:
    """Whether this is a requeued SLURM job (it must resume, whatever its command line says)."""
    return (environ.get("SLURM_RESTART_COUNT") or "0") != "0"


def main(argv: list[str] | None = None, prog: str = "dide-pretrain", stop: StopSignal | None = None,
         description: str | None = None) -> int:
    stop = stop or StopSignal()  # first: a signal during start-up must not be lost
    args = parse_args(argv, prog, description)
    quiet_libraries()
    start_over = args.start_over and not requeued()
    if args.start_over and not start_over:
        print(f"{prog}: note: a requeued job resumes; --start-over applied to its first start only", file=sys.stderr)
    try:
        env = distributed.detect()
        cfg = load_config(args.config, args.overrides, world_size=env.world_size)
        if args.print_config:
            print(print_config(cfg, " ".join([prog, "--config", args.config, *args.overrides])), end="")
            return 0
        from .engine import build_ds_config
        ds = build_ds_config(cfg, env.world_size)
        preflight(cfg, env.world_size, start_over)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg, env, ds, stop, start_over)
    except (LeaseHeld, RunDirMismatch) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return summary["exit_code"]


def step_exit_code(code: int, signum: int | None, environ: dict | None = None) -> int:
    """The exit code this process hands srun.  srun (``--kill-on-bad-exit`` or the cluster's
    ``KillOnBadExit``) ends the whole step as soon as one task exits non-zero, so ranks that
    all exit 42 one after the other kill the slower ones while they still tear down, and
    the step reports 143 instead of 42.  After a stop checkpoint (every rank has saved its
    part and passed the final barrier) only rank 0 reports 42: the others exit 0 and rank 0
    exits ``STEP_EXIT_GRACE_S`` later.  After a SIGTERM, SLURM is ending the step itself
    and the code is not shaped (there is no time to wait: KillWait)."""
    if code != REQUEUE_EXIT_CODE or signum == signal.SIGTERM:
        return code
    env = distributed.detect(environ)
    if env.launcher != "srun" or env.world_size == 1:
        return code
    if env.rank != 0:
        return 0
    time.sleep(STEP_EXIT_GRACE_S)
    return code


def cli(prog: str = "dide-pretrain", description: str | None = None) -> int:
    """The console entry point: :func:`main`, with the exit code shaped for srun.  The launch
    is read from the environment as it was at start: the trainer exports RANK, WORLD_SIZE
    and the rest for torch.distributed, after which any process looks torchrun-launched."""
    stop = StopSignal()
    at_start = dict(os.environ)
    code = main(None, prog, stop, description)
    return step_exit_code(code, signal.SIGTERM if stop.terminated else stop.received, at_start)


if __name__ == "__main__":
    sys.exit(cli())
