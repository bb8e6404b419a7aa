"""Checkpoints: exact resume after SIGKILL (2 ranks), fallback from a truncated
checkpoint, resume at another world size, refusal of files that are not ours."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import record, tiny_overrides
from dist_utils import free_port

from dide_scale.train import main


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/loss"] for r in rows}


def launch(argv: list[str], nproc: int = 2) -> list[subprocess.Popen]:
    """One process per rank with torchrun's variables (no agent in between, so what a
    surviving rank does when its peer dies is our code's behaviour, not torchrun's)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "dide_scale.train", *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_all(procs, timeout=600) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        o, _ = p.communicate(timeout=timeout)
        out.append((p.returncode, o))
    return out


def args(shards, out, **extra):
    base = {"train.max_steps": 6, "train.save_every": 3, "train.global_batch_size": 8, "train.micro_batch_size": 2,
            "data.num_workers": 1, "train.keep_last": 5}
    base.update(extra)
    return ["--config", "debug", *tiny_overrides(shards, out, **base)]


@pytest.mark.distributed
def test_rank_sigkilled_mid_step_then_relaunch_equals_uninterrupted(demo_shards, tmp_path):
    """SIGKILL one of 2 ranks right after the step-3 checkpoint (mid-step 4): the other
    rank exits by itself instead of hanging; the relaunch resumes from step 3 and the
    losses of steps 4-6 equal the uninterrupted run's, bitwise."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    for code, out in wait_all(launch(args(demo_shards, full))):
        assert code == 0, out[-3000:]
    procs = launch(args(demo_shards, killed, **{"train.collective_timeout_s": 30}))
    marker = killed / "checkpoints" / "step_00000003" / "COMPLETE.json"
    deadline = time.time() + 600
    while not marker.exists() and procs[1].poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert marker.exists()
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    procs[0].wait(timeout=120)  # must not hang
    detect_s = time.time() - t_kill
    assert procs[0].returncode != 0 and detect_s < 60
    assert not (killed / "summary.json").exists()
    for code, out in wait_all(launch(args(demo_shards, killed))):
        assert code == 0, out[-3000:]
    a, b = losses(full), losses(killed)
    assert [a[s] for s in (4, 5, 6)] == [b[s] for s in (4, 5, 6)]  # bitwise on CPU
    assert json.loads((killed / "summary.json").read_text())["samples_seen"] == 6 * 8
    record("rank_dies", seconds_to_detect=round(detect_s, 2), steps_lost=0, resumed_from=3,
           losses_equal_after_resume=True)


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
    for code, out in wait_all(launch(args(demo_shards, run, **{"train.max_steps": 2, "train.save_every": 2}))):
        assert code == 0, out[-3000:]
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
    (d / "COMPLETE.json").write_text(json.dumps({"step": 1, "world_size": 1, "files": {
        "dide_rank00000.pt": (d / "dide_rank00000.pt").stat().st_size}}))
    problem, state = Checkpointer(tmp_path)._readable(d)  # what every rank does before it resumes
    assert state is None and re.search("[Ww]eights only|weights_only|Unsupported", problem)
    assert not (tmp_path / "pwned").exists()


def test_a_rank_reads_only_its_own_and_the_shared_files_before_resuming(tmp_path, monkeypatch):
    """Before a resume each rank checks the files it will load: its own shards and state and
    the files every rank reads, not the other ranks' (whose number grows with the world size,
    and so would every rank's stat() and reads)."""
    from dide_scale import checkpoint
    d = tmp_path / "checkpoints" / "step_00000005"
    d.mkdir(parents=True)
    names = ["mp_rank_00_model_states.pt", *[f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)],
             *[f"dide_rank{r:05d}.pt" for r in range(4)]]
    for name in names:
        torch.save({"state": {}}, d / name)
    (d / "COMPLETE.json").write_text(json.dumps({"step": 5, "world_size": 4, "files": {
        n: (d / n).stat().st_size for n in names}}))
    read = []
    monkeypatch.setattr(checkpoint, "read_through", lambda path, size=None: read.append(path.name))
    monkeypatch.setattr(checkpoint, "rank", lambda: 2)
    monkeypatch.setattr(checkpoint, "world_size", lambda: 4)
    problem, own = checkpoint.Checkpointer(tmp_path)._readable(d)
    assert problem is None and own == {"state": {}}
    assert sorted(read) == ["dide_rank00002.pt", "mp_rank_00_model_states.pt",
                            "zero_pp_rank_2_mp_rank_00_optim_states.pt"]
