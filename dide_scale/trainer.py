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
from . import engine as eng_mod
from .build import build_student, build_teacher, generation, teacher_source
from .captions import evaluate_captions
from .checkpoint import COMPLETE, Checkpointer, tag_for
from .config import ConfigError, save_resolved
from .data.pipeline import DataWaitInterrupted, build_loader
from .data.transforms import check_tokenizers, load_tokenizer
from .distributed import BAD_STEPS_EXIT_CODE, LEASE_LOST_EXIT_CODE, REQUEUE_EXIT_CODE
from .engine import partitioned_params, synchronize
from .evaluate import evaluate, evaluate_retrieval
from .export import export_from_checkpoint
from .labels import label_map_for
from .lease import LeaseLost
from .metrics import MetricsLogger, attention_figure, model_flops_per_sample, peak_flops
from .models.attention import t2i_i2t
from .models.images import unpatchify
from .objective import DistillObjective, batch_to_device
from .rng import GlobalRng, seed_all, step_rng, step_seed

log = logging.getLogger("dide_scale")

# What each rank brings to the vote before a step's collectives (the largest wins on every rank)
GO, DATA_FAILED, STOP, LEASE_LOST = 0, 1, 2, 3
FINISH_WAIT_S = 4 * 3600  # how long the other ranks wait for rank 0's final export


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


@dataclass
class StepResult:
    """What one optimizer step gives the metrics: device tensors, averaged over its micro-batches
    (no host sync), and host timings summed over them."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]  # the loss's named terms
    times: dict[str, float]  # seconds: data_wait, teacher_forward, student_forward, student_backward, optimizer
    scalars: dict[str, torch.Tensor]  # data/patch_fill (real patches / patch slots) and the model's own stats


def train_step(engines, objective, batches, accum: int, timed: bool, key: tuple = (0, 0, 0)) -> StepResult:
    """One optimizer step = ``accum`` micro-batches.  ``key`` = (seed, rank, step): every random
    draw of micro-batch i comes from ``rng.step_seed(*key, i)``, so a resumed run repeats the
    steps exactly."""
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
            out = objective.training_forward(b, timed=timed, generator=gen)
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
    return StepResult(loss_sum / accum, {k: v / accum for k, v in parts_sum.items()}, times,
                      {"data/patch_fill": fill / accum, **stats})


def evaluates(cfg) -> bool:
    """Whether the run evaluates on data.val_shards: every task of the dual encoder (ITM by
    retrieval recall), the classification tasks of a fusion student."""
    return bool(cfg.data.val_shards) and (cfg.train.task != "itm" or cfg.student.kind == "dual")


class Evaluator:
    """Dev-split evaluation of the student; ``accuracy`` is the selection score (ITM
    pre-training: the mean of text->image and image->text recall@1, ranked by
    ``train.eval_retrieval``).  A second call at the same step returns the first result."""

    def __init__(self, cfg, engines, metrics, control=None):
        self.cfg, self.engines, self.metrics, self.control = cfg, engines, metrics, control
        self.enabled = evaluates(cfg)
        self.last: tuple[int, dict] | None = None

    def __call__(self, step: int) -> dict:
        if self.last is not None and self.last[0] == step:
            return self.last[1]
        cfg, eng = self.cfg, self.engines
        bs = max(cfg.train.micro_batch_size, 32)
        module = eng.student_module
        rank, world = distributed.rank(), distributed.world_size()
        if cfg.train.task == "itm":  # each rank embeds its share; the embeddings are gathered and ranked
            was = module.training
            res = evaluate_retrieval(module, build_loader(cfg, "val", rank, world, batch_size=bs, exclusive=True),
                                     cfg.train.eval_retrieval, eng.device, eng.dtype,
                                     max_batches=cfg.train.eval_batches, prepare=False, k=cfg.train.eval_retrieval_k,
                                     group=self.control, partitioned=cfg.train.zero_stage == 3)
            module.train(was)
            res["per_type"] = {k: v for k, v in res.items() if "_r@" in k}
            res["accuracy"] = (res["t2i_r@1"] + res["i2t_r@1"]) / 2
        elif cfg.train.task == "caption":
            res = self.evaluate_captions(step, bs)
        else:  # each rank its share of the split, the sums added over ranks
            loader = build_loader(cfg, "val", rank, world, batch_size=bs)
            res = evaluate(module, loader, cfg.train.task, eng.device, eng.dtype,
                           max_batches=cfg.train.eval_batches, group=self.control)
        prefix = "eval/" if cfg.train.task == "caption" else "eval/acc_"
        self.metrics.scalars({"eval/accuracy": res["accuracy"],
                              **{f"{prefix}{k}": v for k, v in res["per_type"].items()}}, step)
        log.info("eval step %d: accuracy %.4f  %s", step, res["accuracy"],
                 "  ".join(f"{k} {v:.3f}" for k, v in res["per_type"].items()))
        res.pop("predictions", None)
        self.last = (step, res)
        return res

    def evaluate_captions(self, step: int, batch_size: int) -> dict:
        """Captioning: decode the dev split (each rank its share), score it with the COCO metrics
        (``accuracy`` is CIDEr-D); a few captions go to TensorBoard as text."""
        cfg, eng = self.cfg, self.engines
        loader = build_loader(cfg, "val", distributed.rank(), distributed.world_size(), batch_size=batch_size)
        res = evaluate_captions(eng.student_module, loader, load_tokenizer(cfg.data.tokenizer), generation(cfg),
                                eng.device, eng.dtype, cfg.caption.metrics, cfg.train.eval_batches, group=self.control)
        self.metrics.text("eval/captions", "\n".join(f"{p['image_id']}: {p['caption']}"
                                                     for p in res["predictions"][:8]), step)
        return res


class BackgroundExport:
    """Rank 0's exports of new best models, each in a process of its own: consolidating a
    large sharded checkpoint takes minutes, which the other ranks would spend in the next
    step's collectives (timing out after train.collective_timeout_s).  One runs at a time
    (they write the same folder); a newer best waits for it, replacing an older one that
    waited.  A checkpoint to be exported is pinned against purging until its export ends.

    ``inline``: a run of one process exports a checkpoint under ``INLINE_MAX_BYTES`` itself,
    at once: no other rank waits, the export takes a fraction of a second, and a new
    interpreter (torch, DeepSpeed) would cost several seconds of CPU per new best.  The
    global RNG is left as it was, so a run's steps do not depend on how it exported."""

    INLINE_MAX_BYTES = 64 << 20

    def __init__(self, run_dir: Path, checkpointer, inline: bool = False):
        self.run_dir, self.checkpointer, self.inline = run_dir, checkpointer, inline
        self.proc = None
        self.running: tuple[Path, str] | None = None
        self.pending: tuple[Path, str, dict] | None = None

    def start(self, out: Path, tag: str, best: dict) -> None:
        if self.pending is not None:
            self.checkpointer.pinned.discard(self.pending[1])
        self.pending = (out, tag, dict(best))
        self.checkpointer.pinned.add(tag)
        self.poll()

    def _small(self, tag: str) -> bool:
        files = (self.checkpointer.dir / tag).rglob("*")
        return sum(f.stat().st_size for f in files if f.is_file()) <= self.INLINE_MAX_BYTES

    def _export_here(self, out: Path, tag: str, best: dict) -> None:
        try:
            with torch.random.fork_rng(devices=[]):
                export_from_checkpoint(self.run_dir, out, tag=tag, best=best)
        except Exception as e:  # the run goes on: a failed export of a best model is reported, as below
            log.error("the export of %s to %s failed: %s", tag, out, e)
        else:
            log.info("exported %s -> %s", tag, out)
        finally:
            self.checkpointer.pinned.discard(tag)

    def _launch(self, out: Path, tag: str, best: dict) -> None:
        if self.inline and self._small(tag):
            self._export_here(out, tag, best)
            return
        log.info("%s -> %s: exporting in the background (%s)", tag, out, self.run_dir / "logs" / "export.log")
        import os
        import subprocess
        import sys
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "logs" / "export.log", "a") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dide_scale.export", str(self.run_dir), str(out), "--tag", tag,
                 "--best", json.dumps(best)], stdout=log_file, stderr=subprocess.STDOUT,
                env=dict(os.environ, CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu"))  # consolidation: CPU only
        self.running = (out, tag)

    def poll(self) -> bool:
        """Whether no export is running or waiting (one that has just ended is reported, a
        waiting one started)."""
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                return False
            out, tag = self.running
            self.checkpointer.pinned.discard(tag)
            if code:
                log.error("the export of %s to %s failed (exit code %d): see %s", tag, out, code,
                          self.run_dir / "logs" / "export.log")
            else:
                log.info("exported %s -> %s", tag, out)
            self.proc = self.running = None
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._launch(*pending)
            return self.proc is None
        return True

    def wait(self) -> None:
        while not self.poll():
            self.proc.wait()

    def cancel(self) -> None:
        """Stop the running export and drop a waiting one (the directory is not ours any more)."""
        self.pending = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.checkpointer.pinned.discard(self.running[1])
            self.proc = self.running = None


class BestSelector:
    """Model selection on the dev split (``data.val_shards``) only: the best score so far,
    resumable.  ``improves`` is rank 0's verdict, followed by every rank (each evaluated the
    same split); the trainer then checkpoints that step (exact fp32 master weights) and
    ``export`` has rank 0 write them, in the background, to ``RUN_DIR/best`` with
    ``best.json`` naming the step and score."""

    def __init__(self, cfg, is_main: bool, control=None, exports: BackgroundExport | None = None):
        self.cfg, self.is_main, self.control, self.exports = cfg, is_main, control, exports
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

    def export(self, step: int) -> None:
        """Rank 0 starts exporting checkpoint ``step`` (the new best) to ``RUN_DIR/best``."""
        if not self.is_main:
            return
        out = self.run_dir / "best"
        log.info("new best on the dev split: %.4f at step %d -> %s", self.best["accuracy"], step, out)
        self.exports.start(out, tag_for(step), self.best)

    def reconcile(self, checkpoints: Path) -> None:
        """After a resume (rank 0): a best whose export was cut short (the job was stopped or
        killed during it) is exported again from its checkpoint, if that is still there."""
        if not self.is_main or self.best is None:
            return
        f = self.run_dir / "best" / "best.json"
        if f.exists() and json.loads(f.read_text())["step"] == self.best["step"]:
            return
        if (checkpoints / tag_for(self.best["step"]) / COMPLETE).exists():
            self.export(self.best["step"])
        else:
            log.warning("the best model on record (step %d) was never exported and its checkpoint is gone",
                        self.best["step"])

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

    def __init__(self, cfg, env: distributed.DistEnv, ds_config: dict, stop, control=None, lease=None):
        self.cfg, self.env, self.ds_config, self.stop, self.control = cfg, env, ds_config, stop, control
        self.lease = lease  # rank 0's hold on the run directory (None elsewhere)
        self.run_dir = Path(cfg.train.output_dir)
        seed_all(cfg.train.seed)  # identical initial replicas on every rank
        tok = load_tokenizer(cfg.data.tokenizer)
        if len(tok) > cfg.student.arch.vocab_size:
            raise ConfigError(f"data.tokenizer has {len(tok)} tokens but student.arch.vocab_size="
                              f"{cfg.student.arch.vocab_size}")
        student, teacher = build_student(cfg), build_teacher(cfg)
        if teacher is not None:
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
        self.objective = DistillObjective(self.engines.student, self.engines.teacher, cfg.loss, cfg.train.task,
                                sync=eng_mod.synchronize, label_map=self.label_map).train()
        self.probe = probe_batch(cfg, self.engines) if cfg.train.probe_every and teacher is not None \
            and cfg.loss.attn_t2i + cfg.loss.attn_i2t > 0 else None
        self.evaluator = Evaluator(cfg, self.engines, self.metrics, control)
        self.best = BestSelector(cfg, env.is_main, control)
        parts = {"train": self.state, "data": self.data, "rng": self.rng, "best": self.best}
        if self.objective.queue is not None:
            parts["token_queue"] = self.objective.queue
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_last, self.engines.student, parts,
                                         cfg.to_dict(), control, lost=lambda: lease.lost if lease else None)
        self.best.exports = self.exports = BackgroundExport(self.run_dir, self.checkpointer,
                                                            inline=env.world_size == 1)
        self.skipped_before = 0

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> dict:
        """Resume, train to ``train.max_steps`` (or a stop), finish; returns the summary."""
        st, cfg = self.state, self.cfg.train
        self.resume()
        batches, exit_code = iter(self.loader), 0
        self.data.mark()
        try:
            while st.step < cfg.max_steps:
                micro, waited_s, verdict = self.step_data(batches)
                if verdict == LEASE_LOST:
                    raise LeaseLost("the run directory's lease was taken by another job")
                if verdict == STOP:  # the step has not started: checkpoint the one before, with its data position
                    log.warning("stop signal received: checkpointing at step %d and exiting for requeue", st.step)
                    exit_code = self.checkpoint_for_requeue()
                    break
                self.step(micro, waited_s)
                if st.bad_steps >= cfg.max_bad_steps:
                    log.error("%d consecutive non-finite steps: stopping (last good checkpoint kept)", st.bad_steps)
                    exit_code = BAD_STEPS_EXIT_CODE
                    break
                if self.due(cfg.eval_every) and self.evaluator.enabled:
                    self.evaluate()
                if self.due(cfg.save_every) and st.bad_steps == 0:  # never inside a streak of bad steps
                    self.exports.poll()
                    self.checkpointer.save(st.step)
        except LeaseLost as e:
            log.error("%s: stopping without writing anything more to %s", e, self.run_dir)
            exit_code = LEASE_LOST_EXIT_CODE
        finally:
            batches.close()  # shut the data-loader workers down (they ignore stop signals)
        return self.finish(exit_code)

    def step_data(self, batches) -> tuple[list, float, int]:
        """This step's micro-batches, then the ranks' vote on running it: (batches, seconds
        waited, verdict).  Every rank has its data before any rank enters the step's
        collectives, so a rank still waiting for data when a stop signal arrives meets the
        others in this vote (a CPU all-reduce), not inside a collective they cannot leave:
        they checkpoint the step before together.  A rank whose data failed (stalled, a
        source unreadable) takes the others down with it at once, instead of leaving them
        in a collective until train.collective_timeout_s."""
        t0, micro, own, failure = time.perf_counter(), [], GO, None
        try:
            for _ in range(self.accum):
                micro.append(next(batches))
        except DataWaitInterrupted as e:
            log.warning("%s", e)
            own = STOP
        except Exception as e:  # noqa: BLE001 - re-raised below, after the others learnt of it
            own, failure = DATA_FAILED, e
        if self.stop.received is not None:
            own = max(own, STOP)
        if self.lease is not None and self.lease.lost:
            own = LEASE_LOST
        verdict = distributed.max_over_ranks(own, self.control)
        if verdict == DATA_FAILED:
            if failure is not None:
                raise failure
            raise RuntimeError("another rank could not read its training data (its log names the shards)")
        return micro, time.perf_counter() - t0, verdict

    def step(self, micro: list, waited_s: float = 0.0) -> None:
        """One optimizer step on its micro-batches and its bookkeeping: counters, the bad-step
        streak, metrics, probe."""
        st, cfg = self.state, self.cfg.train
        log_now = (st.step + 1) % cfg.log_every == 0 or st.step + 1 == cfg.max_steps
        res = train_step(self.engines, self.objective, iter(micro), self.accum, timed=log_now,
                         key=(cfg.seed, self.env.rank, st.step))
        res.times["data_wait"] += waited_s
        self.data.mark()
        st.step += 1
        st.samples_seen += cfg.global_batch_size
        skipped = self.engines.student.skipped_steps  # non-finite gradients / fp16 overflow
        bad = is_bad_step(skipped > self.skipped_before, cfg.precision, res.loss, self.control)
        st.bad_steps = st.bad_steps + 1 if bad else 0
        self.skipped_before = skipped
        self.metrics.add_step(res.parts, res.loss, res.times, res.scalars)
        if log_now:
            self.log_step(skipped)
        if self.probe is not None and (st.step % cfg.probe_every == 0 or st.step == 1):
            log_attention_probe(self.objective, self.engines, self.probe, self.metrics, st.step, self.cfg)

    def due(self, every: int) -> bool:
        """Whether a periodic action falls on this step (the last step has its own, in ``finish``)."""
        return bool(every) and self.state.step % every == 0 and self.state.step < self.cfg.train.max_steps

    def evaluate(self) -> dict:
        """Dev-split evaluation, then model selection on it."""
        st = self.state
        result = self.evaluator(st.step)
        if self.best.improves(st.step, result["accuracy"], healthy=st.bad_steps == 0):
            self.exports.poll()  # a finished export unpins its checkpoint before this save purges
            self.checkpointer.save(st.step)
            self.best.export(st.step)
        return result

    def checkpoint_for_requeue(self) -> int:
        self.checkpointer.save(self.state.step)
        return REQUEUE_EXIT_CODE

    # -- around the loop ------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the newest intact checkpoint, if any; record the run's settings."""
        st, cfg, eng = self.state, self.cfg, self.engines
        if self.checkpointer.resume() is not None:
            log.info("resuming at step %d (%d samples seen)", st.step, st.samples_seen)
            self.best.reconcile(self.checkpointer.dir)
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
        if cfg.train.zero_stage == 3:
            log.info("ZeRO-3: %d of the student's %d parameter tensors partitioned across ranks (the others are under "
                     "stage3_param_persistence_threshold and stay whole)", *partitioned_params(eng.student_module))
        log.info("training %s: %d steps, global batch %d (micro %d x accum %d x world %d), ZeRO-%d, %s, teacher %s",
                 cfg.train.task, cfg.train.max_steps, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                 self.accum, self.env.world_size, cfg.train.zero_stage, cfg.train.precision, teacher)

    def log_step(self, skipped: int) -> None:
        st, student = self.state, self.engines.student
        skipped_samples, seen, retries = self.loader.counters()
        extra = {"optim/lr": student.get_lr()[0], "optim/loss_scale": eng_mod.loss_scale(student),
                 "optim/skipped_steps": float(skipped), "progress/samples_seen": float(st.samples_seen)}
        gn = eng_mod.grad_norm(student)
        if gn is not None:
            extra["optim/grad_norm"] = gn
        self.metrics.log(st.step, extra, {"data/skipped": skipped_samples, "data/seen": seen},
                         {"data/retries": float(retries)})

    def finish(self, exit_code: int) -> dict:
        """After the loop.  A run that reached ``train.max_steps`` checkpoints, evaluates,
        selects and exports its final step; every run writes its summary.  Rank 0 exports
        (and waits for a best model's export) while the others wait on the CPU group for as
        long as that takes, not in a collective bound by train.collective_timeout_s."""
        cfg, st = self.cfg, self.state
        summary = {"step": st.step, "samples_seen": st.samples_seen, "exit_code": exit_code}
        if exit_code == 0:
            try:
                self.checkpointer.save(st.step)
                if self.evaluator.enabled:
                    summary["eval"] = self.evaluate()
                    summary["best"] = self.best.best
            except LeaseLost as e:
                log.error("%s: stopping without writing anything more to %s", e, self.run_dir)
                exit_code = summary["exit_code"] = LEASE_LOST_EXIT_CODE
        if exit_code == 0:
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
            if exit_code == LEASE_LOST_EXIT_CODE:
                self.exports.cancel()
            else:
                self.exports.wait()
            if exit_code == 0:
                export_from_checkpoint(self.run_dir, self.run_dir / "export", self.engines.student_module,
                                       tag_for(st.step), cfg, best=None)
            if exit_code != LEASE_LOST_EXIT_CODE:  # else the directory is another job's now
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        distributed.wait_for_rank0(self.control, FINISH_WAIT_S)
        return summary


# -- the attention probe (TensorBoard images of teacher vs student attention) -------------

def probe_batch(cfg, engines) -> dict:
    """A fixed batch (the first of the validation split, else of the first training shard)."""
    spec = cfg.data.val_shards or cfg.data.train_shards.split("::")[0]
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.data.val_shards = spec
    batch = next(iter(build_loader(probe_cfg, "val", batch_size=2)))
    return batch_to_device(batch, engines.device, engines.dtype)


@torch.no_grad()
def log_attention_probe(objective, engines, b: dict, metrics, step: int, cfg) -> None:
    """Teacher vs student t2i / i2t attention of probe sample 0 as TensorBoard images.

    Every rank runs the forwards (ZeRO-3 gathers parameters collectively); rank 0 draws."""
    module = engines.student_module
    was = module.training
    module.eval()
    gen = torch.Generator(device=b["input_ids"].device).manual_seed(cfg.train.seed)  # the same negatives every time
    s = objective.student_forward(b, capture=True, generator=gen, model=module)
    module.train(was)
    t_qk = objective.teacher_forward(b, s.rows, capture=True).qk
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
