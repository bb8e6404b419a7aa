"""The training loop and its parts.

    trainer = Trainer(cfg, env, ds_config, stop, control)   # wiring: models, engines, data, parts
    summary = trainer.fit()                                  # resume, loop, finish

Every resumable part is a ``Stateful`` (``state_dict`` / ``load_state_dict``) handed to the
:class:`~dide_scale.checkpoint.Checkpointer`, which owns saving and resuming:

    train        TrainState     step, samples seen                           same on every rank
    data         DataPosition   the loader's position after the last step    per rank
    rng          GlobalRng      Python / NumPy / torch global RNGs           per rank
    best         BestSelector   the best dev-split score so far              same on every rank
    token_queue  TokenQueue     teacher token states (loss.token_nce only)   same on every rank

A per-rank part cannot continue on another world size: the checkpointer restarts it from
the step instead (new data streams and RNG seeds, never a replay).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed

log = logging.getLogger("dide_scale")
REQUEUE_EXIT_CODE = 42  # "checkpointed on a stop signal: requeue me" (see slurm/ and launch/)
BAD_STEPS_EXIT_CODE = 3


@dataclass
class TrainState:
    """Progress counters.  ``bad_steps`` (the current streak of non-finite steps) is not
    resumable: a checkpoint is never written inside a streak."""

    step: int = 0
    samples_seen: int = 0
    bad_steps: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.samples_seen = state["step"], state["samples_seen"]


class DataPosition:
    """The training loader's position as of the last completed step (``mark`` after each):
    a checkpoint taken when a step could not complete resumes with that step's data."""

    per_rank = True

    def __init__(self, loader, seed: int):
        self.loader, self.seed = loader, seed
        self.position = loader.state_dict()

    def mark(self) -> None:
        self.position = self.loader.state_dict()

    def state_dict(self) -> dict:
        return self.position

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.mark()

    def restart(self, step: int) -> None:
        log.warning("world size changed since the checkpoint: the data position restarts with fresh streams "
                    "(seed %d + step)", self.seed)
        self.loader.ds.seed = self.seed + step
        self.mark()


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


def train_step(engines, task, batches, accum: int, timed: bool, key: tuple = (0, 0, 0)):
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
    return (loss_sum / accum, {k: v / accum for k, v in parts_sum.items()}, times,
            {"data/patch_fill": fill / accum, **stats})


def evaluates(cfg) -> bool:
    """Whether the run evaluates on data.val_shards: every task of the dual encoder (ITM by
    contrastive retrieval recall), the classification tasks of a fusion student."""
    return bool(cfg.data.val_shards) and (cfg.train.task != "itm" or cfg.student.kind == "dual")


class Evaluator:
    """Dev-split evaluation of the student; ``accuracy`` is the selection score (ITM
    pre-training: the mean of text->image and image->text recall@1 of the contrastive
    embeddings).  A second call at the same step returns the first result."""

    def __init__(self, cfg, engines, metrics, control=None):
        self.cfg, self.engines, self.metrics, self.control = cfg, engines, metrics, control
        self.enabled = evaluates(cfg)
        self.last: tuple[int, dict] | None = None

    def __call__(self, step: int) -> dict:
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        from .data.pipeline import build_loader
        from .evaluate import evaluate, evaluate_retrieval
        cfg, eng = self.cfg, self.engines
        bs = max(cfg.train.micro_batch_size, 32)
        module = eng.student_module
        if cfg.train.task == "itm":  # retrieval ranks every caption against every image: each rank reads it all
            was = module.training
            res = evaluate_retrieval(module, build_loader(cfg, "val", batch_size=bs), "itc", eng.device, eng.dtype,
                                     max_batches=cfg.train.eval_batches, prepare=False)
            module.train(was)
            res["per_type"] = {k: v for k, v in res.items() if "_r@" in k}
            res["accuracy"] = (res["t2i_r@1"] + res["i2t_r@1"]) / 2
        else:  # each rank its share of the split, the sums added over ranks
            loader = build_loader(cfg, "val", distributed.rank(), distributed.world_size(), batch_size=bs)
            res = evaluate(module, loader, cfg.train.task, eng.device, eng.dtype,
                           max_batches=cfg.train.eval_batches, group=self.control)
        self.metrics.scalars({"eval/accuracy": res["accuracy"],
                              **{f"eval/acc_{k}": v for k, v in res["per_type"].items()}}, step)
        log.info("eval step %d: accuracy %.4f  %s", step, res["accuracy"],
                 "  ".join(f"{k} {v:.3f}" for k, v in res["per_type"].items()))
        res.pop("predictions", None)
        self.last = (step, res)
        return res


class BestSelector:
    """Model selection on the dev split (``data.val_shards``) only: the best score so far,
    resumable.  ``improves`` is rank 0's verdict, followed by every rank (each evaluated the
    same split); the trainer then checkpoints that step (exact fp32 master weights) and
    ``export`` writes them to ``RUN_DIR/best`` with ``best.json`` naming the step and score."""

    def __init__(self, cfg, is_main: bool, control=None):
        self.cfg, self.is_main, self.control = cfg, is_main, control
        self.run_dir = Path(cfg.train.output_dir)
        self.best: dict | None = None  # {"step", "accuracy"}

    def improves(self, step: int, score: float, healthy: bool) -> bool:
        """Whether ``score`` at ``step`` beats every earlier one (never inside a streak of
        non-finite steps: ``healthy`` False); if so it becomes the best."""
        better = healthy and (self.best is None or score > self.best["accuracy"])
        if not distributed.rank0_decides(better, self.control):
            return False
        self.best = {"step": step, "accuracy": score}
        return True

    def export(self, module, step: int) -> None:
        if not self.is_main:
            return
        from .checkpoint import tag_for
        from .export import export_from_checkpoint
        out = self.run_dir / "best"
        export_from_checkpoint(self.run_dir, out, module, tag_for(step), self.cfg, best=self.best)
        (out / "best.json").write_text(json.dumps({**self.best, "split": self.cfg.data.val_shards}, indent=2))
        log.info("new best on the dev split: %.4f at step %d -> %s", self.best["accuracy"], step, out)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = best_on_record(state.get("best"), self.run_dir)


def best_on_record(best: dict | None, run_dir: Path) -> dict | None:
    """The better of a resumed best and ``best/best.json`` (written after the last checkpoint
    when the final evaluation won)."""
    f = run_dir / "best" / "best.json"
    if not f.exists():
        return best
    rec = json.loads(f.read_text())
    if best is None or rec["accuracy"] > best["accuracy"]:
        return {"step": rec["step"], "accuracy": rec["accuracy"]}
    return best


class Trainer:
    """Construction wires every part; ``fit`` resumes, loops and finishes."""

    def __init__(self, cfg, env: distributed.DistEnv, ds_config: dict, stop, control=None):
        from . import engine as eng_mod
        from .build import build_student, build_teacher
        from .checkpoint import Checkpointer
        from .config import ConfigError
        from .data.pipeline import build_loader
        from .data.transforms import check_tokenizers, load_tokenizer
        from .labels import label_map_for
        from .metrics import MetricsLogger, model_flops_per_sample, peak_flops
        from .rng import GlobalRng, seed_all
        from .task import DistillTask
        self.cfg, self.env, self.ds_config, self.stop, self.control = cfg, env, ds_config, stop, control
        self.run_dir = Path(cfg.train.output_dir)
        seed_all(cfg.train.seed)  # identical initial replicas on every rank
        tok = load_tokenizer(cfg.data.tokenizer)
        if len(tok) > cfg.student.arch.vocab_size:
            raise ConfigError(f"data.tokenizer has {len(tok)} tokens but student.arch.vocab_size="
                              f"{cfg.student.arch.vocab_size}")
        student, teacher = build_student(cfg), build_teacher(cfg)
        if teacher is not None:
            from .build import teacher_source
            check_tokenizers(tok, teacher_source(cfg), getattr(teacher, "vocab_size", None) or teacher.shape.vocab_size)
        self.engines = eng_mod.build_engines(cfg, ds_config, student, teacher)
        self.loader = build_loader(cfg, "train", env.rank, env.world_size,
                                   status_dir=str(self.run_dir / "logs" / "data"),
                                   interrupt=lambda: stop.received is not None)
        self.state = TrainState()
        self.data = DataPosition(self.loader, cfg.train.seed)
        self.rng = GlobalRng(cfg.train.seed, env.rank)  # per-rank streams outside the steps' own keys
        self.accum = cfg.grad_accum_steps(env.world_size)
        flops = model_flops_per_sample(cfg, teacher)
        self.metrics = MetricsLogger(str(self.run_dir), env.rank, env.world_size, cfg.train.global_batch_size,
                                     cfg.train.max_steps, flops["total"], peak_flops(cfg.train.peak_tflops))
        self.label_map = label_map_for(cfg) if teacher is not None else None
        self.task = DistillTask(self.engines.student, self.engines.teacher, cfg.loss, cfg.train.task,
                                sync=eng_mod.synchronize, label_map=self.label_map).train()
        self.probe = probe_batch(cfg, self.engines) if cfg.train.probe_every and teacher is not None \
            and cfg.loss.attn_t2i + cfg.loss.attn_i2t > 0 else None
        self.evaluator = Evaluator(cfg, self.engines, self.metrics, control)
        self.best = BestSelector(cfg, env.is_main, control)
        parts = {"train": self.state, "data": self.data, "rng": self.rng, "best": self.best}
        if self.task.queue is not None:
            parts["token_queue"] = self.task.queue
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_last, self.engines.student, parts,
                                         cfg.to_dict(), control)
        self.skipped_before = 0

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict:
        """Resume, train to ``train.max_steps`` (or a stop), finish; returns the summary."""
        st, cfg = self.state, self.cfg.train
        from .data.pipeline import DataWaitInterrupted
        self.resume()
        batches, exit_code = iter(self.loader), 0
        self.data.mark()
        try:
            while st.step < cfg.max_steps:
                try:
                    self.step(batches)
                except DataWaitInterrupted as e:
                    # the step never completed: checkpoint the one before, with its data position (a
                    # rank stuck elsewhere, e.g. in a collective of this step, makes the agreement time
                    # out after train.collective_timeout_s with an error instead)
                    log.warning("%s: agreeing on a checkpoint of step %d with the other ranks", e, st.step)
                    distributed.any_rank(True, self.control)  # meets the other ranks' stop check below
                    exit_code = self.checkpoint_for_requeue()
                    break
                if st.bad_steps >= cfg.max_bad_steps:
                    log.error("%d consecutive non-finite steps: stopping (last good checkpoint kept)", st.bad_steps)
                    exit_code = BAD_STEPS_EXIT_CODE
                    break
                if self.due(cfg.eval_every) and self.evaluator.enabled:
                    self.evaluate()
                if distributed.any_rank(self.stop.received is not None, self.control):
                    log.warning("stop signal received: checkpointing at step %d and exiting for requeue", st.step)
                    exit_code = self.checkpoint_for_requeue()
                    break
                if self.due(cfg.save_every) and st.bad_steps == 0:  # never inside a streak of bad steps
                    self.checkpointer.save(st.step)
        finally:
            batches.close()  # shut the data-loader workers down (they ignore stop signals)
        return self.finish(exit_code)

    def step(self, batches) -> None:
        """One optimizer step and its bookkeeping: counters, the bad-step streak, metrics, probe."""
        st, cfg = self.state, self.cfg.train
        log_now = (st.step + 1) % cfg.log_every == 0 or st.step + 1 == cfg.max_steps
        loss, parts, times, scalars = train_step(self.engines, self.task, batches, self.accum, timed=log_now,
                                                 key=(cfg.seed, self.env.rank, st.step))
        self.data.mark()
        st.step += 1
        st.samples_seen += cfg.global_batch_size
        skipped = self.engines.student.skipped_steps  # non-finite gradients / fp16 overflow
        bad = is_bad_step(skipped > self.skipped_before, cfg.precision, loss, self.control)
        st.bad_steps = st.bad_steps + 1 if bad else 0
        self.skipped_before = skipped
        self.metrics.add_step(parts, loss, times, scalars)
        if log_now:
            self.log_step(skipped)
        if self.probe is not None and (st.step % cfg.probe_every == 0 or st.step == 1):
            log_attention_probe(self.task, self.engines, self.probe, self.metrics, st.step, self.cfg)

    def due(self, every: int) -> bool:
        """Whether a periodic action falls on this step (the last step has its own, in ``finish``)."""
        return bool(every) and self.state.step % every == 0 and self.state.step < self.cfg.train.max_steps

    def evaluate(self) -> dict:
        """Dev-split evaluation, then model selection on it."""
        st = self.state
        result = self.evaluator(st.step)
        if self.best.improves(st.step, result["accuracy"], healthy=st.bad_steps == 0):
            self.checkpointer.save(st.step)
            self.best.export(self.engines.student_module, st.step)
        return result

    def checkpoint_for_requeue(self) -> int:
        self.checkpointer.save(self.state.step)
        return REQUEUE_EXIT_CODE

    # -- around the loop ------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the newest intact checkpoint, if any; record the run's settings."""
        from .config import save_resolved
        st, cfg, eng = self.state, self.cfg, self.engines
        if self.checkpointer.resume() is not None:
            log.info("resuming at step %d (%d samples seen)", st.step, st.samples_seen)
        self.skipped_before = eng.student.skipped_steps
        if self.env.is_main:
            save_resolved(cfg, self.run_dir, self.ds_config)
        if st.step == 0:
            self.metrics.text("config/resolved", cfg.to_yaml())
            self.metrics.text("config/deepspeed", json.dumps(self.ds_config, indent=2))
        if self.label_map is not None:
            log.info("label space: %s", self.label_map.summary())
            self.metrics.text("labels/teacher", self.label_map.summary())
            self.metrics.scalars({"labels/teacher_missing": float(len(self.label_map.missing))}, st.step)
        teacher = "none" if eng.teacher is None else ("ZeRO-3 partitioned" if eng.teacher_partitioned else "replicated")
        log.info("training %s: %d steps, global batch %d (micro %d x accum %d x world %d), ZeRO-%d, %s, teacher %s",
                 cfg.train.task, cfg.train.max_steps, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                 self.accum, self.env.world_size, cfg.train.zero_stage, cfg.train.precision, teacher)

    def log_step(self, skipped: int) -> None:
        from . import engine as eng_mod
        st, student = self.state, self.engines.student
        skipped_samples, seen, retries = self.loader.counters()
        extra = {"optim/lr": student.get_lr()[0], "optim/loss_scale": eng_mod.loss_scale(student),
                 "optim/skipped_steps": float(skipped), "progress/samples_seen": float(st.samples_seen)}
        gn = eng_mod.grad_norm(student)
        if gn is not None:
            extra["optim/grad_norm"] = gn
        out = self.metrics.log(st.step, extra, {"data/skipped": skipped_samples, "data/seen": seen},
                               {"data/retries": float(retries)})
        if self.env.is_main:
            with open(self.run_dir / "logs" / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": st.step, **out}) + "\n")

    def finish(self, exit_code: int) -> dict:
        """After the loop.  A run that reached ``train.max_steps`` checkpoints, evaluates,
        selects and exports its final step; every run writes its summary."""
        cfg, st = self.cfg, self.state
        summary = {"step": st.step, "samples_seen": st.samples_seen, "exit_code": exit_code}
        if exit_code == 0:
            self.checkpointer.save(st.step)
            if self.evaluator.enabled:
                summary["eval"] = self.evaluate()
                summary["best"] = self.best.best
            if self.env.is_main:
                from .checkpoint import tag_for
                from .export import export_from_checkpoint
                export_from_checkpoint(self.run_dir, self.run_dir / "export", self.engines.student_module,
                                       tag_for(st.step), cfg, best=None)
            summary["export"] = str(self.run_dir / "export")
        if "eval" in summary:
            lo = cfg.loss
            self.metrics.hparams({"task": cfg.train.task, "lr": cfg.optim.lr,
                                  "global_batch": cfg.train.global_batch_size,
                                  "attn_t2i": lo.attn_t2i, "attn_i2t": lo.attn_i2t, "soft_label": lo.soft_label,
                                  "ground_truth": lo.ground_truth, "zero_stage": cfg.train.zero_stage,
                                  "precision": cfg.train.precision}, {"hparam/accuracy": summary["eval"]["accuracy"]})
        self.metrics.close()
        if self.env.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        distributed.barrier()
        return summary


# -- the attention probe (TensorBoard images of teacher vs student attention) -------------

def probe_batch(cfg, engines) -> dict:
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
    s = task.student_forward(b, capture=True, generator=gen, model=module)
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
    img = attention_figure(heads_mean(t_t2i)[:n_txt, : 1 + n_img].mean(0),
                           heads_mean(s_t2i)[:n_txt, : 1 + n_img].mean(0),
                           heads_mean(t_i2t)[: 1 + n_img, :n_txt], heads_mean(s_i2t)[: 1 + n_img, :n_txt], (gh, gw),
                           unpatchify(images, 0).float().cpu())
    metrics.image("attention/teacher_vs_student", img, step)
