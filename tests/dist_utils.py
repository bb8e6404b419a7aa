"""Run a function on N gloo ranks in fresh processes and collect what each returns.

The function is referenced as "module:function" so the child imports it; each rank gets
RANK/WORLD_SIZE/MASTER_* in its environment and writes its JSON-able result to a file.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dide_scale.distributed import free_port

CHILD = r"""
import importlib, json, os, sys
sys.path.insert(0, os.environ["DIDE_TEST_DIR"])
mod, fn = os.environ["DIDE_TEST_FN"].split(":")
out = getattr(importlib.import_module(mod), fn)(json.loads(os.environ["DIDE_TEST_ARGS"]))
with open(os.environ["DIDE_TEST_OUT"] + f".{os.environ['RANK']}", "w") as f:
    json.dump(out, f)
"""


def spawn_ranks(fn: str, world: int, args: dict, tmp: Path) -> list[subprocess.Popen]:
    """Start ``fn`` on ``world`` ranks without waiting (``collect`` gathers the results)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                   DIDE_TEST_DIR=str(Path(__file__).parent), DIDE_TEST_FN=fn, DIDE_TEST_ARGS=json.dumps(args),
                   DIDE_TEST_OUT=str(tmp / "result"))
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def run_ranks(fn: str, world: int, args: dict, tmp: Path, timeout: int = 600) -> list:
    return collect(spawn_ranks(fn, world, args, tmp), tmp, timeout)


def collect(procs: list[subprocess.Popen], tmp: Path, timeout: int = 600) -> list:
    """Each rank's returned value, in rank order; a rank that failed raises with its output."""
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for rank, p in enumerate(procs):
        if p.returncode != 0:
            raise RuntimeError(f"rank {rank} exited {p.returncode}:\n{outputs[rank][-5000:]}")
    return [json.loads((tmp / f"result.{r}").read_text()) for r in range(len(procs))]
