"""TensorBoard: run a few steps and read the event files back with tensorboard's own
EventAccumulator."""
import json
import math

import numpy as np
import torch
from conftest import labelled, tiny_overrides
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dide_scale.models.fusion import FusionEncoder
from dide_scale.models.saved import save_pretrained
from dide_scale.models.student import TowerShape
from dide_scale.train import main


def test_tensorboard_has_every_health_signal(demo_shards, tmp_path):
    shape = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)
    torch.manual_seed(0)
    save_pretrained(labelled(FusionEncoder(shape, "vqa", 16)), tmp_path / "teacher")
    out = tmp_path / "run"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, out, **{
        "teacher.path": str(tmp_path / "teacher"), "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0,
        "loss.soft_label": 1.0, "loss.ground_truth": 1.0, "train.probe_every": 2, "train.peak_tflops": 0.05,
        "train.max_steps": 4, "train.log_every": 2})]) == 0
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    want = {"loss/loss", "loss/attn_t2i", "loss/attn_i2t", "loss/soft_label", "loss/ground_truth",
            "optim/lr", "optim/grad_norm", "optim/loss_scale", "optim/skipped_steps",
            "throughput/samples_per_s", "throughput/samples_per_s_per_device", "throughput/mfu",
            "throughput/model_tflops_per_device", "time/data_wait_s", "time/teacher_forward_s",
            "time/student_forward_s", "time/student_backward_s", "time/optimizer_s", "time/step_s",
            "time/data_wait_fraction", "memory/host_rss_gb", "data/skipped_total", "data/seen_total",
            "data/seen/train", "eval/accuracy"}
    assert want <= scalars, want - scalars
    for tag in want:
        events = acc.Scalars(tag)
        assert events and all(math.isfinite(e.value) for e in events), tag
    assert [e.step for e in acc.Scalars("loss/loss")] == [2, 4]
    assert acc.Scalars("throughput/mfu")[0].value > 0
    assert acc.Scalars("data/seen/train")[-1].value == 4 * 8  # samples handed to training
    # the attention probe: teacher and student maps side by side, a real finite RGB image
    assert "attention/teacher_vs_student" in tags["images"]
    imgs = acc.Images("attention/teacher_vs_student")
    assert [i.step for i in imgs] == [1, 2, 4]
    import io

    from PIL import Image
    arr = np.asarray(Image.open(io.BytesIO(imgs[-1].encoded_image_string)))
    assert arr.ndim == 3 and arr.shape[2] >= 3 and np.isfinite(arr).all() and arr.std() > 0
    # config and DeepSpeed config as text at step 0
    text_tags = set(tags["tensors"])
    assert {"config/resolved/text_summary", "config/deepspeed/text_summary"} <= text_tags


def test_the_metrics_logger_writes_metrics_jsonl_on_rank_0_only(tmp_path):
    from dide_scale.metrics import MetricsLogger
    for rank in (0, 1):
        run = tmp_path / f"rank{rank}"
        (run / "logs").mkdir(parents=True)
        m = MetricsLogger(str(run), rank, 1, 8, 10, 1.0, None, enabled_tb=False)
        for step in (1, 2):
            m.add_step({"itc": torch.tensor(0.5)}, torch.tensor(float(step)), {"data_wait": 0.0})
            out = m.log(step, {"optim/lr": 0.1}, {})
        jsonl = run / "logs" / "metrics.jsonl"
        if rank:
            assert not jsonl.exists()
            continue
        rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and rows[-1] == {"step": 2, **out}
        assert rows[0]["loss/loss"] == 1.0 and rows[0]["loss/itc"] == 0.5 and rows[0]["optim/lr"] == 0.1
