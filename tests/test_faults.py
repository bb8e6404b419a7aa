"""Fault injection (docs/RELIABILITY.md): numerical faults, bad data at scale, bad
configuration, preemption signals, storage faults during checkpointing."""
import json
import os
import signal
import threading
import time

import pytest
from conftest import record, tiny_overrides

from dide_scale.train import REQUEUE_EXIT_CODE, main


def metrics(run):
    return [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines()]


def poison_steps(monkeypatch, steps: set[int]) -> None:
    """Make the loss of optimizer steps ``steps`` (1-based) NaN, through the real backward and
    optimizer: the trainer's step function is wrapped so that, on those steps, the objective's
    forward returns its loss times NaN."""
    from dide_scale import trainer
    real = trainer.train_step

    def train_step(engines, objective, batches, accum, timed, key=(0, 0, 0)):
        if key[2] + 1 not in steps:
            return real(engines, objective, batches, accum, timed, key)
        forward = objective.training_forward

        def nan_forward(*args, **kwargs):
            out = forward(*args, **kwargs)
            out.loss = out.loss * float("nan")
            return out
        objective.training_forward = nan_forward
        try:
            return real(engines, objective, batches, accum, timed, key)
        finally:
            del objective.training_forward  # the class's method again
    monkeypatch.setattr(trainer, "train_step", train_step)


def test_nan_loss_step_is_skipped_and_counted(demo_shards, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {3})
    run = tmp_path / "run"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **{"train.max_steps": 5})]) == 0
    rows = metrics(run)
    skipped = {r["step"]: r["optim/skipped_steps"] for r in rows}
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[5] == 1
    assert all(r["loss/loss"] == r["loss/loss"] for r in rows if r["step"] != 3)  # finite elsewhere
    record("nan_step", injected_steps=1, skipped_steps=skipped[5], run_completed=True)


def test_consecutive_nan_steps_stop_the_run_with_a_checkpoint_from_before(demo_shards, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {3, 4, 5})
    run = tmp_path / "run"
    code = main(["--config", "debug", *tiny_overrides(demo_shards, run, **{
        "train.max_steps": 8, "train.save_every": 2, "train.max_bad_steps": 3})])
    assert code == 3
    log = (run / "logs" / "rank000.log").read_text()
    assert "3 consecutive non-finite steps" in log
    assert (run / "checkpoints" / "latest").read_text() == "step_00000002"  # from before the fault
    assert not (run / "checkpoints" / "step_00000005").exists()
    record("nan_consecutive", injected_steps=3, stopped_after=3, exit_code=code, kept_checkpoint="step_00000002")


def test_stop_signal_checkpoints_and_exits_for_requeue(demo_shards, tmp_path):
    run = tmp_path / "run"

    sent = {}

    def send_when_running():
        path = run / "logs" / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline:
            if path.exists() and path.read_text().count("\n") >= 2:
                sent["t"] = time.time()
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.02)
    t = threading.Thread(target=send_when_running, daemon=True)
    t.start()
    code = main(["--config", "debug", *tiny_overrides(demo_shards, run, **{"train.max_steps": 200})])
    exit_s = time.time() - sent["t"]
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
    record("preemption", signal="SIGUSR1", seconds_signal_to_exit=round(exit_s, 2), steps_lost=0,
           checkpoint_step=step, exit_code=code)


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
    overrides = tiny_overrides(demo_shards, run, **{"train.max_steps": 6, "train.save_every": 2})
    assert main(["--config", "debug", *overrides]) == 0
    log = (run / "logs" / "rank000.log").read_text()
    assert "resuming at step 2" in log
    record("storage_full", failed_writes=calls["n"], latest_after_failure="step_00000002", resumed_from=2)


def test_bad_data_at_scale_is_skipped_counted_and_training_finishes(tmp_path):
    """A shard set with ~10% bad samples of every kind, plus an unreadable shard file."""
    import io

    from PIL import Image

    from dide_scale.data.demo import generate_split
    from dide_scale.data.pipeline import iter_raw_samples
    from dide_scale.data.shards import ShardWriter
    src = generate_split(tmp_path / "src", 200, 0, samples_per_shard=200)
    big = io.BytesIO()
    Image.new("RGB", (2500, 2500)).save(big, "JPEG")
    q = json.dumps({"question": "is there a red square ?", "answers": {"yes": 1.0}, "qtype": "exist"}).encode()
    breakers = [lambda r: {**r, "jpg": b"GIF89a broken"}, lambda r: {**r, "jpg": r["jpg"][:len(r["jpg"]) // 2]},
                lambda r: {**r, "json": json.dumps({"answers": {}}).encode()},
                lambda r: {**r, "json": json.dumps({"question": ""}).encode()},
                lambda r: {**r, "json": b'{"question": "\xff"}'}, lambda r: {**r, "jpg": big.getvalue(), "json": q},
                lambda r: {k: v for k, v in r.items() if k != "jpg"}]
    out = tmp_path / "salted"
    n_bad = 0
    with ShardWriter(out, 50) as w:
        for i, raw in enumerate(iter_raw_samples(str(src / "00000.tar"))):
            raw = {k: v for k, v in raw.items() if k in ("__key__", "jpg", "txt", "json")}
            if i % 10 == 0:
                raw = breakers[(i // 10) % len(breakers)](raw)
                n_bad += 1
            w.write(raw)
    (out / "00004.tar").write_bytes(b"this is not a tar archive " * 100)  # an unreadable shard file
    run = tmp_path / "run"
    code = main(["--config", "debug", *tiny_overrides(tmp_path, run, **{
        "data.train_shards": f"{out}/{{00000..00004}}.tar", "data.val_shards": "", "data.max_image_pixels": 4_000_000,
        "train.max_steps": 30, "train.log_every": 30, "data.num_workers": 2})])
    assert code == 0
    last = metrics(run)[-1]
    skipped = {k.split("/")[-1]: v for k, v in last.items() if k.startswith("data/skipped/")}
    for reason in ("corrupt_image", "truncated_image", "missing_question", "empty_caption", "non_utf8_caption",
                   "oversized_image", "missing_image", "unreadable_shard"):
        assert skipped.get(reason, 0) >= 1, (reason, skipped)
    record("bad_data", bad_fraction=round(n_bad / 200, 3), steps_completed=30,
           samples_skipped=int(last["data/skipped_total"]), skipped_by_reason=skipped)


@pytest.mark.parametrize("override, named", [
    ("train.nonsense=1", "train.nonsense"),
    ("train.max_steps=lots", "train.max_steps"),
    ("train.global_batch_size=10", "train.global_batch_size"),
    ("data.train_shards=/nowhere/{000..003}.tar", "missing"),
    ("teacher.path=TEACHER_BERT", "teacher.path"),
    ("student.init=export:NOT_OURS", "student.init"),
])
def test_bad_configuration_and_files_fail_before_any_process_group(demo_shards, tmp_path, capsys, override, named):
    import torch.distributed as dist
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    not_ours = tmp_path / "not_ours"
    not_ours.mkdir()
    (not_ours / "pytorch_model.bin").write_bytes(b"junk")
    override = override.replace("TEACHER_BERT", str(bert)).replace("NOT_OURS", str(not_ours))
    extra = ["loss.soft_label=1.0", f"teacher.path={bert}"] if "teacher.path" in override else []
    was_initialized = dist.is_initialized()
    run = tmp_path / "run"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run), *extra, override]) == 2
    assert named in capsys.readouterr().err
    assert not run.exists()
    assert dist.is_initialized() == was_initialized  # no process group was started for this
