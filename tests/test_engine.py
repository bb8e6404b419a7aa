"""DeepSpeed engines on CPU/gloo: 2 ranks at ZeRO-1/2/3 == 1 process on the same global batch."""

import pytest
import torch
from conftest import labelled, tiny_overrides
from dist_utils import run_ranks

# (student ZeRO stage, teacher.zero_stage): the last one partitions the teacher under a ZeRO-2
# student, as the paper preset can
STAGES = [(1, None), (2, None), (3, None), (2, 3)]


def _cfg(shards, out, teacher, stage, micro, world):
    from dide_scale.config import load_config
    s, t = stage
    return load_config("debug", tiny_overrides(shards, out, **{
        "teacher.path": teacher, "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0, "loss.soft_label": 1.0,
        "loss.ground_truth": 1.0, "train.zero_stage": s, "train.global_batch_size": 8,
        "train.micro_batch_size": micro, "optim.warmup_fraction": 0.0,
        "teacher.zero_stage": "null" if t is None else t,
        "teacher.param_persistence_threshold": 0}), world_size=world)  # a tiny teacher: partition everything


def _global_batch(cfg):
    """The first 8 samples of the validation split, in file order (identical on every rank)."""
    from dide_scale.data.pipeline import build_loader
    return next(iter(build_loader(cfg, "val", batch_size=8)))


def _half(batch, i):
    return {k: v[4 * i:4 * i + 4] for k, v in batch.items()}


def _one_step(cfg, halves, accum):
    from dide_scale import engine
    from dide_scale.build import build_student, build_teacher
    from dide_scale.task import DistillTask
    from dide_scale.trainer import train_step
    torch.manual_seed(0)
    student, teacher = build_student(cfg), build_teacher(cfg)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    engines = engine.build_engines(cfg, engine.build_ds_config(cfg, torch.distributed.get_world_size()),
                                   student, teacher)
    t_mod = getattr(engines.teacher, "module", engines.teacher)
    fraction = engine.local_param_fraction(t_mod)
    task = DistillTask(engines.student, engines.teacher, cfg.loss, cfg.train.task)
    task.train()
    loss, parts, _, _ = train_step(engines, task, iter(halves), accum, timed=False)
    teacher_after = engine.full_state_dict(t_mod)
    unchanged = all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    return loss, parts, engine.full_state_dict(engines.student_module), fraction, unchanged


def zero_worker(args):
    """Runs on each of 2 ranks: one step per ZeRO stage on this rank's half of the batch."""
    from pathlib import Path

    import torch.distributed as dist

    from dide_scale import distributed, engine
    env = distributed.detect()
    engine.init_distributed(env, 120)
    out = {}
    for stage in STAGES:
        cfg = _cfg(args["shards"], Path(args["tmp"]) / f"r{stage[0]}_{stage[1]}", args["teacher"], stage, 4,
                   env.world_size)
        batch = _global_batch(cfg)
        loss, parts, sd, fraction, unchanged = _one_step(cfg, [_half(batch, env.rank)], 1)
        vals = torch.stack([loss, *[parts[k] for k in sorted(parts)]])
        dist.all_reduce(vals)
        path = Path(args["tmp"]) / f"params_stage{stage[0]}_{stage[1]}_rank{env.rank}.pt"
        torch.save(sd, path)
        out[f"{stage[0]}_{stage[1]}"] = {"loss": (vals / env.world_size).tolist(), "params": str(path),
                                         "teacher_fraction": fraction,
                      "teacher_unchanged": unchanged}
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from dide_scale.models.fusion import FusionEncoder
    from dide_scale.models.saved import save_pretrained
    from dide_scale.models.student import TowerShape
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("t") / "teacher"
    shape = TowerShape(width=32, depth=2, heads=2, patch_size=8, image_size=[32, 32], max_text_len=16, vocab_size=128)
    save_pretrained(labelled(FusionEncoder(shape, "vqa", 16)), d)
    return d


@pytest.mark.distributed
def test_two_ranks_match_one_process_at_every_zero_stage(demo_shards, teacher_dir, tmp_path):
    from dide_scale import distributed, engine
    results = run_ranks("test_engine:zero_worker", 2, {"shards": str(demo_shards), "teacher": str(teacher_dir),
                                                         "tmp": str(tmp_path)}, tmp_path)
    engine.init_distributed(distributed.detect(), 120)
    for stage in STAGES:
        # reference: one process, same global batch as 2 micro-batches of 4 (what 2 ranks average)
        cfg = _cfg(demo_shards, tmp_path / f"ref{stage[0]}_{stage[1]}", str(teacher_dir), stage, 4, 1)
        batch = _global_batch(cfg)
        loss, parts, ref_sd, fraction, unchanged = _one_step(cfg, [_half(batch, 0), _half(batch, 1)], 2)
        ref_vals = [loss.item(), *[parts[k].item() for k in sorted(parts)]]
        assert unchanged and fraction == 1.0
        for rank, res in enumerate(results):
            r = res[f"{stage[0]}_{stage[1]}"]
            assert r["teacher_unchanged"], (stage, rank)
            assert r["loss"] == pytest.approx(ref_vals, rel=1e-5, abs=1e-6), (stage, rank)
            sd = torch.load(r["params"], weights_only=True)
            for k, v in ref_sd.items():
                assert torch.allclose(sd[k], v, rtol=1e-4, atol=1e-6), (stage, rank, k, (sd[k] - v).abs().max())
            if 3 in stage:  # the teacher is partitioned: each rank holds about half of it
                assert 0.4 < r["teacher_fraction"] < 0.6, r["teacher_fraction"]
            else:
                assert r["teacher_fraction"] == 1.0
    # the step changed the student (the comparison above is not trivially of initial weights)
    from dide_scale.build import build_student
    torch.manual_seed(0)
    init = build_student(cfg).state_dict()
    assert any(not torch.allclose(init[k], ref_sd[k]) for k in init)
