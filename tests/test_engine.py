"""DeepSpeed engines on CPU/gloo: 2 ranks at ZeRO-1/2/3 == 1 process on the same global batch, with
every parameter of a ZeRO-3 model really partitioned (persistence thresholds 0)."""

import pytest
import torch
from conftest import labelled, tiny_overrides
from dist_utils import run_ranks

# (student ZeRO stage, teacher.zero_stage): the last one partitions the teacher under a ZeRO-2
# student, as the paper preset can
STAGES = [(1, None), (2, None), (3, None), (2, 3)]


def _cfg(shards, out, teacher, stage, micro, world, partition_all):
    from dide_scale.config import load_config
    s, t = stage
    return load_config("debug", tiny_overrides(shards, out, **{
        "teacher.path": teacher, "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0, "loss.soft_label": 1.0,
        "loss.ground_truth": 1.0, "train.zero_stage": s, "train.global_batch_size": 8,
        "train.micro_batch_size": micro, "optim.warmup_fraction": 0.0,
        "teacher.zero_stage": "null" if t is None else t,
        "train.ds_config": partition_all if s == 3 else "",  # tiny models: partition every tensor
        "teacher.param_persistence_threshold": 0}), world_size=world)


def _global_batch(cfg):
    """The first 8 samples of the validation split, in file order (identical on every rank)."""
    from dide_scale.data.pipeline import build_loader
    return next(iter(build_loader(cfg, "val", batch_size=8)))


def _half(batch, i):
    return {k: v[4 * i:4 * i + 4] for k, v in batch.items()}


def _one_step(cfg, halves, accum):
    from dide_scale import engine
    from dide_scale.build import build_student, build_teacher
    from dide_scale.objective import DistillObjective
    from dide_scale.trainer import train_step
    torch.manual_seed(0)
    student, teacher = build_student(cfg), build_teacher(cfg)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    engines = engine.build_engines(cfg, engine.build_ds_config(cfg, torch.distributed.get_world_size()),
                                   student, teacher)
    t_mod = getattr(engines.teacher, "module", engines.teacher)
    fraction = engine.local_param_fraction(t_mod)
    obj = DistillObjective(engines.student, engines.teacher, cfg.loss, cfg.train.task)
    obj.train()
    res = train_step(engines, obj, iter(halves), accum, timed=False)
    loss, parts = res.loss, res.parts
    teacher_after = engine.full_state_dict(t_mod)
    unchanged = all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    # outside a forward, a partitioned parameter holds no elements on this rank
    absent = {"student": _absent(engines.student_module), "teacher": _absent(t_mod)}
    return loss, parts, engine.full_state_dict(engines.student_module), fraction, unchanged, absent


def _absent(module) -> float:
    """Fraction of ``module``'s parameter tensors not held whole here (ZeRO-3 released them)."""
    params = list(module.parameters())
    return sum(p.numel() == 0 for p in params) / len(params)


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
                   env.world_size, args["partition_all"])
        batch = _global_batch(cfg)
        loss, parts, sd, fraction, unchanged, absent = _one_step(cfg, [_half(batch, env.rank)], 1)
        vals = torch.stack([loss, *[parts[k] for k in sorted(parts)]])
        dist.all_reduce(vals)
        path = Path(args["tmp"]) / f"params_stage{stage[0]}_{stage[1]}_rank{env.rank}.pt"
        torch.save(sd, path)
        out[f"{stage[0]}_{stage[1]}"] = {"loss": (vals / env.world_size).tolist(), "params": str(path),
                                         "teacher_fraction": fraction, "teacher_unchanged": unchanged,
                                         "absent": absent}
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
def test_two_ranks_match_one_process_at_every_zero_stage(demo_shards, teacher_dir, tmp_path, partition_all):
    from dide_scale import distributed, engine
    results = run_ranks("test_engine:zero_worker", 2, {"shards": str(demo_shards), "teacher": str(teacher_dir),
                                                         "tmp": str(tmp_path), "partition_all": partition_all},
                        tmp_path)
    engine.init_distributed(distributed.detect(), 120)
    for stage in STAGES:
        # reference: one process, same global batch as 2 micro-batches of 4 (what 2 ranks average)
        cfg = _cfg(demo_shards, tmp_path / f"ref{stage[0]}_{stage[1]}", str(teacher_dir), stage, 4, 1, partition_all)
        batch = _global_batch(cfg)
        loss, parts, ref_sd, fraction, unchanged, _ = _one_step(cfg, [_half(batch, 0), _half(batch, 1)], 2)
        ref_vals = [loss.item(), *[parts[k].item() for k in sorted(parts)]]
        assert unchanged and fraction == 1.0
        for rank, res in enumerate(results):
            r = res[f"{stage[0]}_{stage[1]}"]
            assert r["teacher_unchanged"], (stage, rank)
            assert r["loss"] == pytest.approx(ref_vals, rel=1e-5, abs=1e-6), (stage, rank)
            sd = torch.load(r["params"], weights_only=True)
            for k, v in ref_sd.items():
                assert torch.allclose(sd[k], v, rtol=1e-4, atol=1e-6), (stage, rank, k, (sd[k] - v).abs().max())
            if 3 in stage:  # the teacher is partitioned: each rank holds about half of it, and no tensor whole
                assert 0.4 < r["teacher_fraction"] < 0.6, r["teacher_fraction"]
                assert r["absent"]["teacher"] == 1.0, (stage, r["absent"])
            else:
                assert r["teacher_fraction"] == 1.0 and r["absent"]["teacher"] == 0.0
            # a ZeRO-3 student: every tensor is released after the forward, not just the big ones
            assert r["absent"]["student"] == (1.0 if stage[0] == 3 else 0.0), (stage, r["absent"])
    # the step changed the student (the comparison above is not trivially of initial weights)
    from dide_scale.build import build_student
    torch.manual_seed(0)
    init = build_student(cfg).state_dict()
    assert any(not torch.allclose(init[k], ref_sd[k]) for k in init)


# -- ZeRO-Offload ---------------------------------------------------------------------------------

@pytest.mark.slow  # the first use builds DeepSpeed's CPU Adam op (minutes, once per machine)
def test_offload_trains_checkpoints_and_resumes_on_one_cpu_rank(demo_shards, tmp_path, partition_all):
    """train.offload=true (optimizer state and parameters on the CPU, every parameter partitioned)
    trains, is stopped after step 2 and resumes to the losses of an uninterrupted run; the
    shipped ds_configs/zero3_offload.json starts too."""
    import json
    import re
    import signal
    from pathlib import Path

    from dide_scale.train import REQUEUE_EXIT_CODE, StopSignal, main

    def argv(run, **extra):
        return ["--config", "debug", *tiny_overrides(demo_shards, run, **{
            "train.zero_stage": 3, "train.offload": "true", "train.ds_config": partition_all, "train.max_steps": 4,
            "optim.warmup_fraction": 0.0, **extra})]

    def losses(run):
        rows = [json.loads(x) for x in (run / "logs" / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss/loss"] for r in rows}

    class StopAfterStep2(StopSignal):
        @property
        def received(self):
            f = self.run / "logs" / "metrics.jsonl"
            return signal.SIGUSR1 if f.exists() and f.read_text().count("\n") >= 2 else None

        @received.setter
        def received(self, value):
            pass
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert main(argv(full)) == 0
    stop = StopAfterStep2()
    stop.run = stopped
    assert main(argv(stopped), stop=stop) == REQUEUE_EXIT_CODE
    assert main(argv(stopped)) == 0
    log = (stopped / "logs" / "rank000.log").read_text()
    assert "resuming at step 2" in log and re.search(r"ZeRO-3: (\d+) of the student's \1 parameter tensors partitioned",
                                                     log)
    ds = json.loads((full / "ds_config.json").read_text())["zero_optimization"]
    assert ds["offload_optimizer"]["device"] == "cpu" and ds["offload_param"]["device"] == "cpu"
    a, b = losses(full), losses(stopped)
    # not bitwise: DeepSpeed's CPU Adam keeps beta^t as a running product, and a fresh optimizer
    # (the resumed one) computes it with pow() instead: the last bits of the update differ
    assert sorted(b) == [1, 2, 3, 4] and a[3] == b[3] and b[4] == pytest.approx(a[4], rel=1e-6)
    assert a[4] < a[1]  # it learns
    shipped = Path(__file__).resolve().parents[1] / "ds_configs" / "zero3_offload.json"
    assert main(argv(tmp_path / "shipped", **{"train.offload": "false", "train.ds_config": str(shipped),
                                               "train.max_steps": 2})) == 0


def test_zero3_itm_pretraining_evaluates_with_every_parameter_partitioned(demo_shards, itm_teacher, tmp_path,
                                                                           partition_all):
    """ITM pre-training at ZeRO-3 with the student and the teacher partitioned down to the last
    tensor: training (hard negatives, attention and soft-label distillation, ITC), attention
    probes and retrieval evaluation, whose cached [CLS] embeddings once read a partitioned
    weight outside its module's forward and crashed."""
    import json
    import re

    from dide_scale.train import main
    run = tmp_path / "run"
    assert main(["--config", "debug", *tiny_overrides(demo_shards, run, **{
        "train.task": "itm", "teacher.path": str(itm_teacher), "loss.attn_t2i": 1.0, "loss.attn_i2t": 1.0,
        "loss.soft_label": 1.0, "loss.itc": 1.0, "train.zero_stage": 3, "train.ds_config": partition_all,
        "teacher.param_persistence_threshold": 0, "train.max_steps": 2, "train.eval_every": 1,
        "train.probe_every": 1})]) == 0
    log = (run / "logs" / "rank000.log").read_text()
    assert re.search(r"ZeRO-3: (\d+) of the student's \1 parameter tensors partitioned", log)
    assert "teacher ZeRO-3 partitioned" in log and "eval step 1" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval"]["n_texts"] == 48 and 0 <= summary["eval"]["t2i_r@1"] <= 1
