"""End-to-end: dide-pretrain's main() on tiny data through the real DeepSpeed engine
(world size 1, gloo) and the webdataset reader."""
import json
import os

import pytest
import torch
from conftest import labelled, tiny_overrides
from safetensors.torch import load_file

from dide_scale.build import build_student
from dide_scale.config import load_config
from dide_scale.models.fusion import FusionEncoder
from dide_scale.models.images import images_from_pixels
from dide_scale.models.saved import load_pretrained, save_pretrained
from dide_scale.models.student import TowerShape
from dide_scale.train import main

SHAPE = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("teacher") / "fusion"
    save_pretrained(labelled(FusionEncoder(SHAPE, "vqa", 16)), d)
    return d


def test_distillation_run_end_to_end(demo_shards, teacher_dir, tmp_path):
    out = tmp_path / "run"
    before = load_file(str(teacher_dir / "model.safetensors"))
    argv = ["--config", "debug", *tiny_overrides(
        demo_shards, out, **{"teacher.path": str(teacher_dir), "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0,
                             "loss.soft_label": 1.0, "loss.ground_truth": 0.5, "train.save_every": 2})]
    assert main(argv) == 0
    # the run directory holds everything the README promises
    assert (out / "config.yaml").exists() and (out / "ds_config.json").exists()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "latest").read_text() == "step_00000004"
    hist = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    for part in ("attn_t2i", "attn_i2t", "soft_label", "ground_truth"):
        assert all(torch.isfinite(torch.tensor(h[f"loss/{part}"])) for h in hist)
    # the teacher file is untouched, and no teacher weight reaches the student checkpoint or export
    after = load_file(str(teacher_dir / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    ckpt_files = list((out / "checkpoints").rglob("*model_states.pt"))
    assert ckpt_files
    for f in ckpt_files:
        sd = torch.load(f, map_location="cpu", weights_only=False)["module"]
        assert not any(k.startswith(("teacher", "text_embeddings", "vit.", "pooler")) for k in sd)
        assert any(k.startswith("image.vit.") for k in sd)
    exported = load_pretrained(out / "export")
    assert exported.task == "vqa"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and 0.0 <= summary["eval"]["accuracy"] <= 1.0


def test_teacher_is_frozen_and_outside_the_optimizer(demo_shards, teacher_dir, tmp_path):
    """Through the real engine: after steps, teacher weights are unchanged and absent from
    the optimizer; the student did change."""
    from dide_scale import distributed, engine
    from dide_scale.build import build_teacher
    from dide_scale.data.pipeline import build_loader
    from dide_scale.objective import DistillObjective
    from dide_scale.trainer import train_step
    cfg = load_config("debug", tiny_overrides(demo_shards, tmp_path, **{
        "teacher.path": str(teacher_dir), "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0, "loss.soft_label": 1.0}))
    env = distributed.detect()
    engine.init_distributed(env, 60)
    student, teacher = build_student(cfg), build_teacher(cfg)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s_before = {k: v.clone() for k, v in student.state_dict().items()}
    engines = engine.build_engines(cfg, engine.build_ds_config(cfg, 1), student, teacher)
    obj = DistillObjective(engines.student, engines.teacher, cfg.loss, "vqa")
    obj.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    batches = iter(build_loader(cfg))
    for _ in range(2):
        loss = train_step(engines, obj, batches, cfg.grad_accum_steps(1), timed=False).loss
        assert torch.isfinite(loss)
    opt_ids = {id(p) for g in engines.student.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in opt_ids for p in teacher.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())
    assert any(not torch.equal(s_before[k], v) for k, v in engines.student_module.state_dict().items())


def test_bad_inputs_fail_before_training(demo_shards, tmp_path, capsys):
    base = tiny_overrides(demo_shards, tmp_path / "x")
    assert main(["--config", "debug", *base, "train.nonsense=1"]) == 2
    assert "train.nonsense" in capsys.readouterr().err
    assert main(["--config", "debug", *base, f"data.train_shards={tmp_path}/nope/{{0..3}}.tar"]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing was started


def test_teacher_directory_errors(tmp_path, teacher_dir):
    from dide_scale.build import build_teacher
    cfg = load_config("debug", ["teacher.path=" + str(tmp_path / "missing"), "loss.soft_label=1.0"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_teacher(cfg)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cfg = load_config("debug", ["teacher.path=" + str(tmp_path / "bert"), "loss.soft_label=1.0"])
    with pytest.raises(ValueError, match="model_type='bert'.*dide_fusion"):
        build_teacher(cfg)
    cfg = load_config("debug", ["teacher.path=" + str(tmp_path / "bert"), "loss.soft_label=1.0",
                                "teacher.kind=hf_vilt"])
    with pytest.raises(ValueError, match="vilt"):
        build_teacher(cfg)


def test_export_reloads_without_deepspeed_and_matches(tmp_path):
    cfg = load_config("debug", ["train.task=vqa"])
    torch.manual_seed(0)
    student = build_student(cfg).eval()
    save_pretrained(student, tmp_path / "exp")
    back = load_pretrained(tmp_path / "exp").eval()
    x = images_from_pixels(torch.rand(2, 3, 32, 32), 8)
    ids = torch.randint(5, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    assert torch.equal(student(x, ids, mask).logits, back(x, ids, mask).logits)


def test_bf16_with_activation_checkpointing_and_distillation(demo_shards, teacher_dir, tmp_path):
    """bf16 on the DeepSpeed engine (CPU supports it) at ZeRO-2 with fp32 gradient accumulation and
    reductions, the teacher cast to the student's dtype, activation checkpointing in both towers,
    an export from the checkpoint; fp16 on a CPU fails before starting."""
    out = tmp_path / "bf16"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, out, **{
        "train.precision": "bf16", "student.grad_checkpointing": True, "teacher.path": str(teacher_dir),
        "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0, "loss.soft_label": 1.0, "train.zero_stage": 2})]) == 0
    hist = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(h["loss/loss"])) for h in hist)
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] is True  # 2 micro-batches per step, accumulated and reduced in fp32
    assert ds["data_types"]["grad_accum_dtype"] == "fp32" and ds["communication_data_type"] == "fp32"
    assert load_pretrained(out / "export").task == "vqa"
    if not torch.cuda.is_available():
        assert main(["--config", "debug", *tiny_overrides(demo_shards, tmp_path / "fp16"),
                     "train.precision=fp16"]) == 2


def test_bf16_zero1_accumulates_in_fp32_and_exports_the_fp32_master_weights(demo_shards, tmp_path):
    """bf16 at ZeRO-1 accumulates its 2 micro-batches per step in fp32 (DeepSpeed's BF16
    optimizer), and the export consolidates the fp32 master weights from its checkpoint,
    which DeepSpeed's fp32 consolidation cannot read (through the universal conversion)."""
    from safetensors.torch import load_file
    out = tmp_path / "run"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, out, **{
        "train.precision": "bf16", "train.zero_stage": 1, "train.max_steps": 3})]) == 0
    assert json.loads((out / "ds_config.json").read_text())["data_types"]["grad_accum_dtype"] == "fp32"
    ckpt = out / "checkpoints" / "step_00000003"
    assert list(ckpt.glob("bf16_zero_pp_rank_0_*optim_states.pt"))  # the BF16 optimizer's checkpoint
    exported = load_file(str(out / "export" / "model.safetensors"))
    bf16 = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    for k, v in exported.items():
        assert v.dtype == torch.float32 and torch.equal(v.bfloat16(), bf16[k]), k  # the masters of those weights
    assert any(not torch.equal(v, v.bfloat16().float()) for v in exported.values())  # fp32, not bf16 copies


def test_only_rank0_of_an_srun_step_reports_the_requeue(monkeypatch):
    """Under srun with KillOnBadExit, a rank exiting 42 first would kill rank 0 mid-teardown
    (the step then ends 143): the other ranks exit 0 and rank 0 exits 42 after a grace."""
    import signal

    from dide_scale import train
    monkeypatch.setattr(train, "STEP_EXIT_GRACE_S", 0.0)
    step = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"}
    usr1, term = signal.SIGUSR1, signal.SIGTERM
    assert train.step_exit_code(42, usr1, step) == 0
    assert train.step_exit_code(42, usr1, {**step, "SLURM_PROCID": "0"}) == 42
    assert train.step_exit_code(42, term, step) == 42  # SLURM is ending the step itself: no shaping
    assert train.step_exit_code(3, usr1, step) == 3  # failures are reported by every rank
    assert train.step_exit_code(42, usr1, {**step, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == 42
    assert train.step_exit_code(42, usr1, {}) == 42  # not under srun
    # a warning after a termination (SLURM's SIGTERM, then a USR1 from elsewhere) is still a termination
    stop = train.StopSignal()
    for sig in (term, usr1):
        os.kill(os.getpid(), sig)
    assert stop.received == usr1 and stop.terminated


def test_a_one_process_cpu_run_leaves_the_loader_workers_their_cores(monkeypatch):
    """Without OMP_NUM_THREADS, torch's threads are the cores less the data-loader workers
    (they competed for the same cores); with it set, or several ranks, nothing changes."""
    from dide_scale.distributed import DistEnv
    from dide_scale.train import cpu_threads
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    one = DistEnv(0, 0, 1, "127.0.0.1", 29500, "none")
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        cfg = load_config("debug", ["data.num_workers=1"])
        assert cpu_threads(cfg, one) == max(1, cores - 1) == torch.get_num_threads()
        cfg = load_config("debug", [f"data.num_workers={cores + 3}"])
        assert cpu_threads(cfg, one) == 1 == torch.get_num_threads()
        assert cpu_threads(cfg, DistEnv(0, 0, 2, "127.0.0.1", 29500, "torchrun")) is None
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert cpu_threads(cfg, one) is None
    finally:
        torch.set_num_threads(before)
