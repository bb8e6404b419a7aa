"""Time the README's quick start as a newcomer runs it: a fresh clone of this repository,
then ``dide-data demo --out runs/demo_data && dide-pretrain --config debug`` in it, as
written.

    python tools/quickstart_time.py [--repo .] [--keep DIR]

The clone is made from the repository's committed HEAD (uncommitted changes are not in it)
and run with the clone first on PYTHONPATH, in the current environment (the set-up step,
``pip install -e ".[dev]"``, is not timed).  Prints the wall time, the CPU time of the two
commands (user + system, children included: on a machine shared with other jobs it says
more than the wall time) and the load average before and after; fails unless the run ends
with its export.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK_START = "dide-data demo --out runs/demo_data && dide-pretrain --config debug"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]), help="repository to clone")
    ap.add_argument("--keep", default=None, help="clone into this folder and keep it (default: a temp folder)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dide_quickstart_") as tmp:
        clone = Path(args.keep or Path(tmp) / "clone")
        subprocess.run(["git", "clone", "--quiet", args.repo, str(clone)], check=True)
        commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
        env = {**os.environ, "PYTHONPATH": str(clone)}
        load_before = os.getloadavg()
        t0, c0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(["bash", "-c", QUICK_START], cwd=clone, env=env, capture_output=True, text=True)
        wall, c1 = time.monotonic() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = os.getloadavg()
        if proc.returncode != 0 or not (clone / "runs" / "debug" / "export" / "config.json").is_file():
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
            print(f"the quick start failed (exit code {proc.returncode})", file=sys.stderr)
            return 1
        cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
        last = [line for line in proc.stderr.splitlines() if "done: the final weights" in line]
        print(f"commit {commit}, {os.cpu_count()} CPUs: `{QUICK_START}`")
        print(f"wall {wall:.0f} s, CPU (user + system) {cpu:.0f} s, load average "
              f"{load_before[0]:.1f} before, {load_after[0]:.1f} after")
        print(last[-1].split("] ", 1)[-1] if last else "(no closing line)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
