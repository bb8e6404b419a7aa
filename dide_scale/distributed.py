"""Where am I?  The one module that reads the launcher's environment.

Supported: ``torchrun`` / ``deepspeed`` launcher (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), SLURM ``srun`` one task per GPU (SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS, the first node of SLURM_JOB_NODELIST as rendezvous; submitit jobs are srun
tasks too), and a plain single process.  A half-set environment is an error, because
guessing the rest is how jobs hang at the rendezvous.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Write the torchrun-style variables that torch.distributed / DeepSpeed read."""
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port),
                          LOCAL_SIZE=os.environ.get("LOCAL_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))


def world_size() -> int:
    """Ranks in the initialised process group (1 without one)."""
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the initialised process group (0 without one)."""
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list ('node[1-2]' -> 'node1')."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:  # fallback parser for 'prefix[1-3,7]'
        prefix, rest = head.split("[", 1)
        return prefix + rest.rstrip("]").split(",")[0].split("-")[0]
    return head


def detect(environ: dict | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    present = [v for v in TORCHRUN_VARS if v in env]
    if present:
        missing = [v for v in TORCHRUN_VARS if v not in env]
        if missing:
            raise RuntimeError(f"half-set distributed environment: {present} are set but {missing} are not; "
                               "launch with torchrun/deepspeed/srun or unset them")
        return DistEnv(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), env["MASTER_ADDR"],
                       int(env["MASTER_PORT"]), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # inside an srun step (also submitit)
        need = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")
        missing = [v for v in need if v not in env]
        if missing:
            raise RuntimeError(f"incomplete SLURM step environment: {missing} missing")
        port = int(env.get("DIDE_MASTER_PORT", 20000 + int(env["SLURM_JOB_ID"]) % 20000))
        addr = env.get("DIDE_MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"])
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"]), addr, port,
                       "srun")
    return DistEnv(0, 0, 1, "127.0.0.1", free_port(), "single")
