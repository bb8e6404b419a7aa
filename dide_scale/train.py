"""``dide-pretrain``: distillation training (pre-training ITM, or a fine-tuning task).

    dide-pretrain --config debug [key=value ...]

Runs as one process, under ``torchrun``/``deepspeed`` or under ``srun``.  Re-running the
same command on the same ``train.output_dir`` resumes from the newest intact checkpoint.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .config import ConfigError, RunConfig, load_config, save_resolved

log = logging.getLogger("dide_scale")
REQUEUE_EXIT_CODE = 42  # "checkpointed on a stop signal: requeue me" (see slurm/ and launch/)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's time-limit warning and preemption) set a flag; the loop
    agrees on it across ranks at a step boundary and checkpoints."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass

    def _handler(self, signum, frame):
        self.received = signum


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    bad_steps: int = 0
    best: dict | None = None  # {"step", "accuracy"} of the best evaluation on the dev split so far


def is_bad_step(skipped: bool, precision: str, loss: torch.Tensor, group=None) -> bool:
    """Whether a step DeepSpeed skipped counts towards ``train.max_bad_steps``.  Under fp16,
    dynamic loss scaling skips steps by design (the gradients overflowed at the current scale,
    most of all in its start-up search) while the loss was finite: those are not faults.  A
    skip with a non-finite loss on any rank is, and under bf16/fp32 every skip is (only
    non-finite gradients skip a step).  Reads the loss only on a skipped step."""
    if not skipped:
        return False
    if precision != "fp16":
        return True
    return distributed.any_rank(not bool(torch.isfinite(loss).all()), group)


def injected_nan_steps() -> set[int]:
    """Fault injection for the reliability tests: DIDE_INJECT_NAN_STEPS="3,4" makes the loss
    of those optimizer steps NaN (documented in docs/RELIABILITY.md; unset in real runs)."""
    spec = os.environ.get("DIDE_INJECT_NAN_STEPS", "")
    return {int(x) for x in spec.split(",") if x.strip()}


def train_step(engines, task, batches, accum: int, timed: bool, poison: bool = False, key: tuple = (0, 0, 0)):
    """One optimizer step = ``accum`` micro-batches.  ``key`` = (seed, rank, step): every random
    draw of micro-batch i comes from ``rng.step_seed(*key, i)``, so a resumed run repeats the
    steps exactly.  Returns (loss, parts, timings, device scalars for the metrics: the fraction
    of patch slots that hold real image, the model's own stats)."""
    from .engine import synchronize
    from .rng import step_rng, step_seed
    from .task import batch_to_device
    eng = engines.student
    times = {"data_wait": 0.0, "teacher_forward": 0.0, "student_forward": 0.0, "student_backward": 0.0,
             "optimizer": 0.0}
    loss_sum, parts_sum, fill, stats = None, {}, 0.0, {}
    for micro in range(accum):
        t0 = time.perf_counter()
        batch = next(batches)
        b = batch_to_device(batch, engines.device, engines.dtype)
        times["data_wait"] += time.perf_counter() - t0
        fill = fill + b["images"].valid.float().mean()  # real patches / patch slots (no sync)
        with step_rng(step_seed(*key, micro), engines.device) as gen:
            out = task.training_forward(b, timed=timed, generator=gen)
            if poison:
                out.loss = out.loss * float("nan")
            for k in ("teacher_forward", "student_forward"):
                times[k] += out.timings.get(k, 0.0)
            t1 = time.perf_counter()
            eng.backward(out.loss)
        if timed:
            synchronize()
        t2 = time.perf_counter()
        times["student_backward"] += t2 - t1
        eng.step()  # DeepSpeed steps the optimizer (and LR schedule) at the accumulation boundary
        if timed:
            synchronize()
        times["optimizer"] += time.perf_counter() - t2
        loss_sum = out.loss.detach() if loss_sum is None else loss_sum + out.loss.detach()
        for k, v in out.stats.items():
            stats[k] = stats.get(k, 0.0) + v.detach() / accum
        for k, v in out.parts.items():
            parts_sum[k] = v.detach() if k not in parts_sum else parts_sum[k] + v.detach()
    return loss_sum / accum, {k: v / accum for k, v in parts_sum.items()}, times, {"data/patch_fill": fill / accum,
                                                                                   **stats}


def run(cfg: RunConfig, env: distributed.DistEnv, ds_config: dict, stop: StopSignal | None = None) -> dict:
    """Hold the run directory's lease, then build every part, resume if possible, train,
    checkpoint, evaluate.  Returns a summary; raises ``LeaseHeld`` on every rank when another
    job holds the directory."""
    import torch.distributed as dist

    from . import engine as eng_mod
    eng_mod.init_distributed(env, cfg.train.collective_timeout_s)
    control = dist.new_group(backend="gloo") if env.world_size > 1 else None
    lease = hold_lease(Path(cfg.train.output_dir), cfg.train.lease_ttl_s, env.is_main, control)
    try:
        return _run(cfg, env, ds_config, stop, control, lease)
    finally:
        if lease is not None:
            lease.release()


def hold_lease(run_dir: Path, ttl_s: float, is_main: bool, control):
    """Rank 0 takes the run directory's lease; every rank learns the verdict."""
    from .lease import LeaseHeld, RunLease
    lease, refused = None, None
    if is_main:
        try:
            lease = RunLease(run_dir, ttl_s).acquire()
        except LeaseHeld as e:
            refused = str(e)
    refused = distributed.rank0_decides(refused, control)
    if refused:
        raise LeaseHeld(refused)
    return lease


def _run(cfg: RunConfig, env: distributed.DistEnv, ds_config: dict, stop: StopSignal | None, control,
         lease=None) -> dict:
    import torch.distributed as dist

    from . import engine as eng_mod
    from .checkpoint import Checkpointer, tag_for
    from .data.pipeline import DataWaitInterrupted, build_loader
    from .data.transforms import check_tokenizers, load_tokenizer
    from .labels import label_map_for
    from .metrics import MetricsLogger, model_flops_per_sample, peak_flops, setup_logging
    from .models.build import build_student, build_teacher
    from .task import DistillTask

    run_dir = Path(cfg.train.output_dir)
    setup_logging(env.rank, str(run_dir))
    if lease is not None and lease.took_over:
        log.warning("took the run directory's lease over from %s", lease.took_over)
    stop = stop or StopSignal()

    seed_all(cfg.train.seed)  # identical initial replicas on every rank
    tok = load_tokenizer(cfg.data.tokenizer)
    if len(tok) > cfg.student.arch.vocab_size:
        raise ConfigError(f"data.tokenizer has {len(tok)} tokens but student.arch.vocab_size="
                          f"{cfg.student.arch.vocab_size}")
    student = build_student(cfg)
    teacher = build_teacher(cfg)
    if teacher is not None:
        check_tokenizers(tok, cfg.teacher.path)
    engines = eng_mod.build_engines(cfg, ds_config, student, teacher)
    loader = build_loader(cfg, "train", env.rank, env.world_size, status_dir=str(run_dir / "logs" / "data"),
                          interrupt=lambda: stop.received is not None)
    ckpt = Checkpointer(run_dir, cfg.train.keep_last)
    st = TrainState()
    seed_all(cfg.train.seed * 1000 + env.rank)  # per-rank streams for dropout and negative mining
    saved = ckpt.resume(engines.student, group=control)
    if saved is not None:
        s = saved["state"]
        st.step, st.samples_seen, st.best = s["step"], s["samples_seen"], s.get("best")
        if "data" in s:
            loader.load_state_dict(s["data"])
        else:  # world size changed: per-rank streams cannot continue; start new ones, never replay
            log.warning("world size changed since the checkpoint: the data position restarts with fresh "
                        "streams (seed %d + step)", cfg.train.seed)
            loader.ds.seed = cfg.train.seed + st.step
            seed_all(cfg.train.seed * 1000 + env.rank + st.step)
        st.best = best_on_record(st.best, run_dir)
        log.info("resuming at step %d (%d samples seen)", st.step, st.samples_seen)
    if env.is_main:
        save_resolved(cfg, run_dir, ds_config)
    accum = cfg.grad_accum_steps(env.world_size)
    flops = model_flops_per_sample(cfg, teacher)
    metrics = MetricsLogger(str(run_dir), env.rank, env.world_size, cfg.train.global_batch_size, cfg.train.max_steps,
                            flops["total"], peak_flops(cfg.train.peak_tflops))
    probe = _probe_batch(cfg, engines) if cfg.train.probe_every and cfg.loss.attn_t2i + cfg.loss.attn_i2t > 0 \
        and teacher is not None else None
    if st.step == 0:
        metrics.text("config/resolved", cfg.to_yaml())
        metrics.text("config/deepspeed", json.dumps(ds_config, indent=2))
    label_map = label_map_for(cfg) if teacher is not None else None
    if label_map is not None:
        log.info("label space: %s", label_map.summary())
        metrics.text("labels/teacher", label_map.summary())
        metrics.scalars({"labels/teacher_missing": float(len(label_map.missing))}, st.step)
    task = DistillTask(engines.student, engines.teacher, cfg.loss, cfg.train.task, sync=eng_mod.synchronize,
                       label_map=label_map)
    task.train()
    if saved is not None and task.queue is not None:
        if "token_queue" in saved["state"]:
            task.queue.load_state_dict(saved["state"]["token_queue"])
        else:
            log.warning("the checkpoint has no token queue (loss.token_nce was off): it refills from empty")
    batches = iter(loader)
    nan_steps = injected_nan_steps()
    last_eval: dict = {}
    skipped_before = engines.student.skipped_steps
    exit_code = 0
    history_path = run_dir / "logs" / "metrics.jsonl"

    position = loader.state_dict()  # the data position after the last completed step

    def save_checkpoint() -> None:
        """This step's checkpoint, unless one is complete already (rank 0's view decides)."""
        done = (ckpt.dir / f"step_{st.step:08d}" / "COMPLETE.json").exists()
        if not distributed.rank0_decides(done, control):
            ckpt.save(engines.student, st.step, _own_state(st, position, task), cfg.to_dict())
    log.info("training %s: %d steps, global batch %d (micro %d x accum %d x world %d), ZeRO-%d, %s, teacher %s",
             cfg.train.task, cfg.train.max_steps, cfg.train.global_batch_size, cfg.train.micro_batch_size, accum,
             env.world_size, cfg.train.zero_stage, cfg.train.precision,
             "none" if teacher is None else ("ZeRO-3 partitioned" if engines.teacher_partitioned else "replicated"))
    try:
        while st.step < cfg.train.max_steps:
            log_now = (st.step + 1) % cfg.train.log_every == 0 or st.step + 1 == cfg.train.max_steps
            try:
                loss, parts, times, scalars = train_step(engines, task, batches, accum, timed=log_now,
                                                      poison=st.step + 1 in nan_steps,
                                                      key=(cfg.train.seed, env.rank, st.step))
            except DataWaitInterrupted as e:
                # the step never completed: checkpoint the one before, with its data position (a
                # rank stuck elsewhere, e.g. in a collective of this step, makes the agreement time
                # out after train.collective_timeout_s with an error instead)
                log.warning("%s: agreeing on a checkpoint of step %d with the other ranks", e, st.step)
                distributed.any_rank(True, control)
                save_checkpoint()
                exit_code = REQUEUE_EXIT_CODE
                break
            position = loader.state_dict()
            st.step += 1
            st.samples_seen += cfg.train.global_batch_size
            # a step DeepSpeed skipped (non-finite gradients / fp16 overflow) is counted
            skipped_now = engines.student.skipped_steps
            bad = is_bad_step(skipped_now > skipped_before, cfg.train.precision, loss, control)
            st.bad_steps = st.bad_steps + 1 if bad else 0
            skipped_before = skipped_now
            metrics.add_step(parts, loss, times, scalars)
            if log_now:
                skipped, seen, retries = loader.counters()
                extra = {"optim/lr": engines.student.get_lr()[0], "optim/loss_scale": eng_mod.loss_scale(engines.student),
                         "optim/skipped_steps": float(skipped_now), "progress/samples_seen": float(st.samples_seen)}
                gn = eng_mod.grad_norm(engines.student)
                if gn is not None:
                    extra["optim/grad_norm"] = gn
                out = metrics.log(st.step, extra, {"data/skipped": skipped, "data/seen": seen},
                                  {"data/retries": float(retries)})
                if env.is_main:
                    with open(history_path, "a") as f:
                        f.write(json.dumps({"step": st.step, **out}) + "\n")
            if probe is not None and (st.step % cfg.train.probe_every == 0 or st.step == 1):
                log_attention_probe(task, engines, probe, metrics, st.step, cfg)
            if st.bad_steps >= cfg.train.max_bad_steps:
                log.error("%d consecutive non-finite steps: stopping (last good checkpoint kept)", st.bad_steps)
                exit_code = 3
                break
            if cfg.train.eval_every and st.step % cfg.train.eval_every == 0 and cfg.data.val_shards \
                    and evaluates(cfg) and st.step < cfg.train.max_steps:
                last_eval = {"step": st.step, "result": _evaluate(cfg, engines, metrics, st.step, control)}
                keep_if_best(st, last_eval["result"], save_checkpoint, engines.student_module, cfg, env.is_main,
                             control)
            if distributed.any_rank(stop.received is not None, control):
                log.warning("stop signal received: checkpointing at step %d and exiting for requeue", st.step)
                save_checkpoint()
                exit_code = REQUEUE_EXIT_CODE
                break
            # no checkpoint inside a streak of non-finite steps: the newest stays one from before the fault
            if cfg.train.save_every and st.step % cfg.train.save_every == 0 and st.step < cfg.train.max_steps \
                    and st.bad_steps == 0:
                save_checkpoint()
    finally:
        batches.close()  # shut the data-loader workers down (they ignore stop signals)
    summary = {"step": st.step, "samples_seen": st.samples_seen, "exit_code": exit_code}
    if exit_code == 0:
        save_checkpoint()
        if cfg.data.val_shards and evaluates(cfg):
            if last_eval.get("step") == st.step:  # evaluated at this very step already
                summary["eval"] = last_eval["result"]
            else:
                summary["eval"] = _evaluate(cfg, engines, metrics, st.step, control)
            keep_if_best(st, summary["eval"], save_checkpoint, engines.student_module, cfg, env.is_main, control)
            summary["best"] = st.best
        if env.is_main:
            from .export import export_from_checkpoint
            export_from_checkpoint(run_dir, run_dir / "export", engines.student_module, tag_for(st.step), cfg,
                                   best=None)
        summary["export"] = str(run_dir / "export")
    if "eval" in summary:
        metrics.hparams({"task": cfg.train.task, "lr": cfg.optim.lr, "global_batch": cfg.train.global_batch_size,
                         "attn_t2i": cfg.loss.attn_t2i, "attn_i2t": cfg.loss.attn_i2t,
                         "soft_label": cfg.loss.soft_label, "ground_truth": cfg.loss.ground_truth,
                         "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision},
                        {"hparam/accuracy": summary["eval"]["accuracy"]})
    metrics.close()
    if env.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return summary


def _probe_batch(cfg, engines) -> dict:
    """A fixed batch (the first of the validation split, else of the first training shard)."""
    from .data.pipeline import build_loader
    from .task import batch_to_device
    spec = cfg.data.val_shards or cfg.data.train_shards.split("::")[0]
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.data.val_shards = spec
    batch = next(iter(build_loader(probe_cfg, "val", batch_size=2)))
    return batch_to_device(batch, engines.device, engines.dtype)


@torch.no_grad()
def log_attention_probe(task, engines, b: dict, metrics, step: int, cfg) -> None:
    """Teacher vs student t2i / i2t attention of probe sample 0 as TensorBoard images.

    Every rank runs the forwards (ZeRO-3 gathers parameters collectively); rank 0 draws."""
    from .metrics import attention_figure
    from .models.attention import t2i_i2t
    from .models.images import unpatchify
    module = engines.student_module
    was = module.training
    module.eval()
    gen = torch.Generator(device=b["input_ids"].device).manual_seed(cfg.train.seed)  # the same negatives every time
    s = module(b["images"], b["input_ids"], b["attention_mask"], b.get("images2"), capture=True,
               **({"generator": gen} if cfg.train.task == "itm" else {}))
    module.train(was)
    t_qk = task.teacher_forward(b, s.rows, capture=True).qk
    if metrics.writer is None:
        return
    n_txt = int(b["attention_mask"][0].sum())
    images = b["images"]
    gh, gw = (int(v) for v in images.grid()[0])
    n_img = gh * gw
    (t_t2i, t_i2t), (s_t2i, s_i2t) = t2i_i2t(t_qk[0]), t2i_i2t(s.qk[0])

    def heads_mean(lp):  # sample 0, probability averaged over heads
        return lp[0].exp().mean(0).float().cpu()
    img = attention_figure(heads_mean(t_t2i)[:n_txt, : 1 + n_img].mean(0), heads_mean(s_t2i)[:n_txt, : 1 + n_img].mean(0),
                           heads_mean(t_i2t)[: 1 + n_img, :n_txt], heads_mean(s_i2t)[: 1 + n_img, :n_txt], (gh, gw),
                           unpatchify(images, 0).float().cpu())
    metrics.image("attention/teacher_vs_student", img, step)


def keep_if_best(st: TrainState, result: dict, save_checkpoint, module, cfg, is_main: bool, control) -> None:
    """Model selection on the dev split (``data.val_shards``) only: when this evaluation
    beats every earlier one, the weights of this step (exact fp32 master weights from a
    checkpoint, saved now if this step has none) are exported to ``RUN_DIR/best`` with
    ``best.json`` naming the step and score.  Every rank evaluated the same split; rank 0's
    verdict is the one all follow (the save is collective).  Not inside a streak of
    non-finite steps.  The best score is part of the resumable state."""
    better = st.bad_steps == 0 and (st.best is None or result["accuracy"] > st.best["accuracy"])
    if not distributed.rank0_decides(better, control):
        return
    st.best = {"step": st.step, "accuracy": result["accuracy"]}
    save_checkpoint()
    if is_main:
        from .checkpoint import tag_for
        from .export import export_from_checkpoint
        best = Path(cfg.train.output_dir) / "best"
        export_from_checkpoint(Path(cfg.train.output_dir), best, module, tag_for(st.step), cfg, best=st.best)
        (best / "best.json").write_text(json.dumps({**st.best, "split": cfg.data.val_shards}, indent=2))
        log.info("new best on the dev split: %.4f at step %d -> %s", st.best["accuracy"], st.step, best)


def best_on_record(st_best: dict | None, run_dir: Path) -> dict | None:
    """The better of the resumed state's best and ``best/best.json`` (written after the last
    checkpoint when the final evaluation won)."""
    f = run_dir / "best" / "best.json"
    if not f.exists():
        return st_best
    rec = json.loads(f.read_text())
    if st_best is None or rec["accuracy"] > st_best["accuracy"]:
        return {"step": rec["step"], "accuracy": rec["accuracy"]}
    return st_best


def _own_state(st: TrainState, data_position: dict, task) -> dict:
    state = {"step": st.step, "samples_seen": st.samples_seen, "data": data_position, "best": st.best}
    if task.queue is not None:  # identical on every rank; survives a world-size change
        state["token_queue"] = task.queue.state_dict()
    return state


def evaluates(cfg) -> bool:
    """Whether the run evaluates on data.val_shards: every task of the dual encoder (ITM by
    contrastive retrieval recall), the classification tasks of a fusion student."""
    return cfg.train.task != "itm" or cfg.student.kind == "dual"


def _evaluate(cfg, engines, metrics, step, control=None) -> dict:
    """Dev-split evaluation; ``accuracy`` is the selection score (ITM pre-training: the mean of
    text->image and image->text recall@1 of the contrastive embeddings)."""
    from .data.pipeline import build_loader
    from .distributed import rank, world_size
    from .evaluate import evaluate, evaluate_retrieval
    bs = max(cfg.train.micro_batch_size, 32)
    module = engines.student_module
    if cfg.train.task == "itm":  # retrieval ranks every caption against every image: each rank reads it all
        loader = build_loader(cfg, "val", batch_size=bs)
        was = module.training
        res = evaluate_retrieval(module, loader, "itc", engines.device, engines.dtype,
                                 max_batches=cfg.train.eval_batches, prepare=False)
        module.train(was)
        res["per_type"] = {k: v for k, v in res.items() if "_r@" in k}
        res["accuracy"] = (res["t2i_r@1"] + res["i2t_r@1"]) / 2
    else:  # each rank its share of the split, the sums added over ranks
        loader = build_loader(cfg, "val", rank(), world_size(), batch_size=bs)
        res = evaluate(module, loader, cfg.train.task, engines.device, engines.dtype,
                       max_batches=cfg.train.eval_batches, group=control)
    metrics.scalars({"eval/accuracy": res["accuracy"], **{f"eval/acc_{k}": v for k, v in res["per_type"].items()}},
                    step)
    log.info("eval step %d: accuracy %.4f  %s", step, res["accuracy"],
             "  ".join(f"{k} {v:.3f}" for k, v in res["per_type"].items()))
    res.pop("predictions", None)
    return res


def preflight(cfg: RunConfig, world_size: int = 1) -> None:
    """Everything that can be checked before a process group exists: shards (a remote
    source's first shard must answer; epoch mode needs sample counts and enough of them for
    every stream), the teacher directory, the student's initialisation directory, the
    tokenizer."""
    from .data.pipeline import check_streams, expand_sources
    from .data.transforms import load_tokenizer
    from .models.saved import read_model_config
    sources = expand_sources(cfg.data.train_shards, cfg.data.train_weights or None)
    check_streams(sources, cfg, world_size)
    if cfg.data.val_shards:
        check_streams(expand_sources(cfg.data.val_shards), cfg, world_size, train=False)
    if cfg.loss.distills():
        expected = ("vilt",) if cfg.teacher.kind == "hf_vilt" else ("dide_fusion",)
        try:
            read_model_config(cfg.teacher.path, expected)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"teacher.path: {e}") from None
        from .labels import label_map_for
        label_map_for(cfg)  # label names that cannot be matched are refused here, with the numbers
        if cfg.teacher.kind == "hf_vilt":
            from .models.hf_vilt import preprocessing_differences
            for problem in preprocessing_differences(cfg.teacher.path, cfg.data):
                log.warning("the teacher's own preprocessing differs from the data path: %s", problem)
    kind, _, path = cfg.student.init.partition(":")
    if kind in ("vilt", "fusion", "export"):
        expected = {"vilt": ("vilt",), "fusion": ("dide_fusion",), "export": ("dide_dual_encoder", "dide_fusion")}
        try:
            read_model_config(path, expected[kind])
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"student.init: {e}") from None
    load_tokenizer(cfg.data.tokenizer)


def parse_args(argv: list[str] | None, prog: str = "dide-pretrain"):
    ap = argparse.ArgumentParser(prog=prog, description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--config", default="debug", help="YAML file or shipped config name (default: debug)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=10")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, prog: str = "dide-pretrain", stop: StopSignal | None = None) -> int:
    stop = stop or StopSignal()  # first: a signal during start-up must not be lost
    args = parse_args(argv, prog)
    try:
        env = distributed.detect()
        cfg = load_config(args.config, args.overrides, world_size=env.world_size)
        from .engine import build_ds_config
        ds = build_ds_config(cfg, env.world_size)
        preflight(cfg, env.world_size)
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from .lease import LeaseHeld
    try:
        summary = run(cfg, env, ds, stop)
    except LeaseHeld as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return summary["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
