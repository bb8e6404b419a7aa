"""Checkpoints: exact resume after SIGKILL (2 ranks), fallback from a truncated
checkpoint, resume at another world size, refusal of files that are not ours."""
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
from dist_utils import free_port
from dide_scale.train import main


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/loss"] for r in rows}


def torchrun(argv: list[str], nproc: int = 2) -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "dide_scale.train", *argv]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def args(shards, out, **extra):
    base = {"train.max_steps": 6, "train.save_every": 3, "train.global_batch_size": 8, "train.micro_batch_size": 2,
            "data.num_workers": 1, "train.keep_last": 5}
    base.update(extra)
    return ["--config", "debug", *tiny_overrides(shards, out, **base)]


@pytest.mark.distributed
def test_sigkill_after_checkpoint_then_relaunch_equals_uninterrupted(demo_shards, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    p = torchrun(args(demo_shards, full))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    # the interrupted run: SIGKILL every process as soon as the step-3 checkpoint is complete
    p = torchrun(args(demo_shards, killed))
    marker = killed / "checkpoints" / "step_00000003" / "COMPLETE.json"
    deadline = time.time() + 600
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists()
    os.killpg(p.pid, signal.SIGKILL)  # no clean exit: no final checkpoint, no summary
    p.wait()
    assert not (killed / "summary.json").exists()
    p = torchrun(args(demo_shards, killed))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    a, b = losses(full), losses(killed)
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bitwise on CPU
    assert json.loads((killed / "summary.json").read_text())["samples_seen"] == 6 * 8


def test_truncated_newest_checkpoint_falls_back_to_previous(demo_shards, tmp_path, caplog):
    run = tmp_path / "run"
    ov = {"train.max_steps": 4, "train.save_every": 2}
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **ov)]) == 0
    newest = run / "checkpoints" / "step_00000004"
    victim = max((f for f in newest.rglob("*.pt")), key=lambda f: f.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (run / "summary.json").unlink()
    first = losses(run)
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **{**ov, "train.max_steps": 5})]) == 0
    log = (run / "logs" / "rank000.log").read_text()
    assert "skipping checkpoint" in log and "step_00000004" in log and "truncated" in log
    assert "resuming at step 2" in log
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps_after = [r["step"] for r in rows][4:]
    assert steps_after == [3, 4, 5]
    again = {r["step"]: r["loss/loss"] for r in rows[4:]}
    assert again[3] == first[3] and again[4] == first[4]  # the same steps, replayed exactly


def test_incomplete_checkpoint_is_skipped(demo_shards, tmp_path):
    run = tmp_path / "run"
    ov = {"train.max_steps": 2, "train.save_every": 1}
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **ov)]) == 0
    (run / "checkpoints" / "step_00000002" / "COMPLETE.json").unlink()  # a save that never finished
    (run / "summary.json").unlink()
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **{**ov, "train.max_steps": 3})]) == 0
    assert "resuming at step 1" in (run / "logs" / "rank000.log").read_text()


@pytest.mark.distributed
def test_two_rank_checkpoint_resumes_on_one_rank(demo_shards, tmp_path):
    run = tmp_path / "run"
    p = torchrun(args(demo_shards, run, **{"train.max_steps": 2, "train.save_every": 2}))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    (run / "summary.json").unlink()
    assert main(args(demo_shards, run, **{"train.max_steps": 4, "train.save_every": 2, "data.num_workers": 0})) == 0
    log = (run / "logs" / "rank000.log").read_text()
    assert "universal" in log and "resuming at step 2" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 4
    hist = losses(run)
    assert all(torch.isfinite(torch.tensor(hist[s])) for s in (3, 4))


def test_checkpoint_that_runs_code_on_unpickling_is_refused(tmp_path):
    from dide_scale.checkpoint import Checkpointer

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    d = tmp_path / "checkpoints" / "step_00000001"
    d.mkdir(parents=True)
    torch.save({"state": Evil()}, d / "dide_rank00000.pt")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported"):
        Checkpointer(tmp_path)._own_state(d)
    assert not (tmp_path / "pwned").exists()
