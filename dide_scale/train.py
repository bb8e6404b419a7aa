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
from .models.sources import resolve_source
from .trainer import REQUEUE_EXIT_CODE

log = logging.getLogger("dide_scale")
__all__ = ["REQUEUE_EXIT_CODE", "StopSignal", "cli", "main", "preflight", "run", "step_exit_code"]
# how long rank 0 of an srun step waits for the other ranks to be gone before it exits 42
STEP_EXIT_GRACE_S = 5.0


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's time-limit warning and preemption) set a flag; the loop
    agrees on it across ranks at a step boundary and checkpoints."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.received = signum


def run(cfg: RunConfig, env: distributed.DistEnv, ds_config: dict, stop: StopSignal | None = None) -> dict:
    """Hold the run directory's lease, then build the :class:`~dide_scale.trainer.Trainer` and
    fit.  Returns its summary; raises ``LeaseHeld`` on every rank when another job holds the
    directory."""
    import torch.distributed as dist

    from . import engine as eng_mod
    eng_mod.init_distributed(env, cfg.train.collective_timeout_s)
    control = dist.new_group(backend="gloo") if env.world_size > 1 else None
    lease = hold_lease(Path(cfg.train.output_dir), cfg.train.lease_ttl_s, env.is_main, control)
    try:
        from .metrics import setup_logging
        from .trainer import Trainer
        setup_logging(env.rank, cfg.train.output_dir)
        if lease is not None and lease.took_over:
            log.warning("took the run directory's lease over from %s", lease.took_over)
        return Trainer(cfg, env, ds_config, stop or StopSignal(), control).fit()
    finally:
        if lease is not None:
            lease.release()


def hold_lease(run_dir: Path, ttl_s: float, is_main: bool, control):
    """Rank 0 takes the run directory's lease; every rank learns the verdict."""
    from .lease import LeaseHeld, RunLease
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


def preflight(cfg: RunConfig, world_size: int = 1) -> None:
    """Everything that can be checked before a process group exists: shards (a remote
    source's first shard must answer; epoch mode needs sample counts and enough of them for
    every stream), the teacher's files, the student's initialisation files, the tokenizer (Hub
    ids resolved to local snapshots on the way)."""
    from .data.pipeline import check_streams, expand_sources
    from .data.transforms import load_tokenizer
    sources = expand_sources(cfg.data.train_shards, cfg.data.train_weights or None)
    check_streams(sources, cfg, world_size)
    if cfg.data.val_shards:
        check_streams(expand_sources(cfg.data.val_shards), cfg, world_size, train=False)
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
    check_init_files(cfg.student.init)
    load_tokenizer(cfg.data.tokenizer)


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
    from .models.sources import split_init
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


def parse_args(argv: list[str] | None, prog: str = "dide-pretrain"):
    ap = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--config", default="debug", help="YAML file or shipped config name (default: debug)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "dide-pretrain", stop: StopSignal | None = None) -> int:
    stop = stop or StopSignal()  # first: a signal during start-up must not be lost
    args = parse_args(argv, prog)
    try:
        env = distributed.detect()
        cfg = load_config(args.config, args.overrides, world_size=env.world_size)
        from .engine import build_ds_config
        ds = build_ds_config(cfg, env.world_size)
        preflight(cfg, env.world_size)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from .lease import LeaseHeld
    try:
        summary = run(cfg, env, ds, stop)
    except LeaseHeld as e:
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


def cli(prog: str = "dide-pretrain") -> int:
    """The console entry point: :func:`main`, with the exit code shaped for srun.  The launch
    is read from the environment as it was at start: the trainer exports RANK, WORLD_SIZE
    and the rest for torch.distributed, after which any process looks torchrun-launched."""
    stop = StopSignal()
    at_start = dict(os.environ)
    return step_exit_code(main(None, prog, stop), stop.received, at_start)


if __name__ == "__main__":
    sys.exit(cli())
