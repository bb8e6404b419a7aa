"""Fault injection (docs/RELIABILITY.md): numerical faults, bad data at scale, bad
configuration, preemption signals, storage faults during checkpointing."""
import json
import os
import signal
import threading
import time

import pytest

from conftest import tiny_overrides
from dide_scale.train import REQUEUE_EXIT_CODE, main


def metrics(run):
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_nan_loss_step_is_skipped_and_counted(demo_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("DIDE_INJECT_NAN_STEPS", "3")
    run = tmp_path / "run"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **{"train.max_steps": 5})]) == 0
    rows = metrics(run)
    skipped = {r["step"]: r["optim/skipped_steps"] for r in rows}
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[5] == 1
    assert all(r["loss/loss"] == r["loss/loss"] for r in rows if r["step"] != 3)  # finite elsewhere


def test_consecutive_nan_steps_stop_the_run_with_a_checkpoint_from_before(demo_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("DIDE_INJECT_NAN_STEPS", "3,4,5")
    run = tmp_path / "run"
    code = main(["--config", "debug", *tiny_overrides(demo_shards, run, **{
        "train.max_steps": 8, "train.save_every": 2, "train.max_bad_steps": 3})])
    assert code == 3
    log = (run / "logs" / "rank000.log").read_text()
    assert "3 consecutive non-finite steps" in log
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"  # from before the fault
    assert not (run / "checkpoints" / "step_00000005").exists()


def test_stop_signal_checkpoints_and_exits_for_requeue(demo_shards, tmp_path):
    run = tmp_path / "run"

    def send_when_running():
        path = run / "logs" / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            if path.exists() and path.read_text().count("\n") >= 2:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.02)
    t = threading.Thread(target=send_when_running, daemon=True)
    t.start()
    code = main(["--config", "debug", *tiny_overrides(demo_shards, run, **{"train.max_steps": 200})])
    t.join()
    assert code == REQUEUE_EXIT_CODE
    tag = (run / "checkpoints" / "latest").read_text()
    step = int(tag.split("_")[1])
    assert 2 <= step < 200
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == step and summary["exit_code"] == REQUEUE_EXIT_CODE
    # the requeued job continues from exactly there
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **{"train.max_steps": step + 2})]) == 0
    rows = metrics(run)
    assert [r["step"] for r in rows][-2:] == [step + 1, step + 2]


def test_storage_fault_mid_checkpoint_keeps_previous_intact(demo_shards, tmp_path, monkeypatch):
    """The disk fills while the step-4 checkpoint is written: the run fails, the step-2
    checkpoint and the latest pointer stay usable, and a relaunch resumes from step 2."""
    import torch
    run = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *a, **k):
        if "step_00000004" in str(f):
            calls["n"] += 1
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        main(["--config", "debug", *tiny_overrides(demo_shards, run, **{"train.max_steps": 6, "train.save_every": 2})])
    monkeypatch.setattr(torch, "save", real_save)
    assert calls["n"] >= 1
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **{"train.max_steps": 6, "train.save_every": 2})]) == 0
    log = (run / "logs" / "rank000.log").read_text()
    assert "resuming at step 2" in log
