"""Monitoring: TensorBoard scalars/images/text, throughput, MFU, data wait, memory.

Loss parts accumulate on the device between log steps; at a log step they are reduced
across ranks in one collective and read back once (the only host-device sync), then
rank 0 writes them.

MFU = achieved model FLOP/s / (peak FLOP/s x devices), with model FLOPs per sample
counted analytically (matmuls only, 2 FLOPs per multiply-add): the student's forward and
backward (3x forward) of both towers (a fusion student: of its joint sequence, on every row it
scores) plus the teacher's forward on every row it scores.
Per transformer block over N tokens of width d, MLP ratio r:
``2*N*d*d*(4 + 2r)`` (QKV, output projection, MLP) + ``4*N*N*d`` (QK^T and AV).  Image
sequences are counted at their static length (1 + the geometry's patch budget): that is
the work the device does, padding included; ``data/patch_fill`` says how much of it is
real image.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from collections import defaultdict

import torch

from .data.pipeline import geometry
from .distributed import mean_over_ranks, sum_over_ranks

log = logging.getLogger("dide_scale")

# dense bf16 peak FLOP/s per device, by name fragment
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12, "L40S": 362e12, "V100": 125e12}


def block_flops(n: int, d: int, mlp_ratio: float) -> float:
    return 2 * n * d * d * (4 + 2 * mlp_ratio) + 4 * n * n * d


def tower_flops(n: int, d: int, depth: int, mlp_ratio: float) -> float:
    return depth * block_flops(n, d, mlp_ratio)


def model_flops_per_sample(cfg, teacher=None) -> dict[str, float]:
    """{'student', 'teacher', 'total'} FLOPs per training sample (see module docstring).
    ``teacher``: any object with ``width``, ``depth``, ``mlp_ratio`` and ``patch_size`` (both
    teacher kinds have them)."""
    a = cfg.student.arch
    n_patches = geometry(cfg).max_patches
    n_img = n_patches + 1
    n_txt = a.max_text_len
    images = 2 if cfg.train.task == "nlvr2" else 1
    patch = 2 * n_patches * 3 * a.patch_size ** 2 * a.width
    if cfg.student.kind == "fusion":  # one joint sequence per row and image pass (ITM: 3 rows, negatives too)
        rows = 3 if cfg.train.task == "itm" else 1
        fwd = rows * images * (tower_flops(n_img + n_txt, a.width, a.depth, a.mlp_ratio) + patch)
    else:
        fwd = images * (tower_flops(n_img, a.width, a.depth, a.mlp_ratio) + patch) + \
            tower_flops(n_txt, a.width, a.depth, a.mlp_ratio)
    student = 3 * fwd
    teacher_flops = 0.0
    if teacher is not None and cfg.loss.distills():
        t = teacher
        rows = 3 if cfg.train.task == "itm" else images
        t_patch = 2 * n_patches * 3 * t.patch_size ** 2 * t.width
        teacher_flops = rows * (tower_flops(n_img + n_txt, t.width, t.depth, t.mlp_ratio) + t_patch)
    return {"student": student, "teacher": teacher_flops, "total": student + teacher_flops}


def peak_flops(override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for frag, peak in PEAK_FLOPS.items():
            if frag in name:
                return peak
    return None


def host_rss_gb() -> float:
    import psutil
    return psutil.Process(os.getpid()).memory_info().rss / 2 ** 30


class MetricsLogger:
    """Accumulates per-step values; ``log`` reduces, prints one console line and writes
    TensorBoard and ``RUN_DIR/logs/metrics.jsonl`` (one JSON object per logged step) on rank 0."""

    def __init__(self, run_dir: str, rank: int, world: int, global_batch: int, max_steps: int,
                 flops_per_sample: float, peak: float | None, enabled_tb: bool = True):
        self.rank, self.world, self.global_batch, self.max_steps = rank, world, global_batch, max_steps
        self.flops, self.peak = flops_per_sample, peak
        self.writer = None
        self.jsonl = os.path.join(run_dir, "logs", "metrics.jsonl") if rank == 0 else None
        if rank == 0 and enabled_tb:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(run_dir, "tb"))
        self.reset()
        self.t_last = time.perf_counter()
        self.t_start = self.t_last

    def reset(self) -> None:
        self.parts: dict[str, torch.Tensor] = {}
        self.times: dict[str, float] = defaultdict(float)
        self.steps = 0

    def add_step(self, parts: dict[str, torch.Tensor], loss: torch.Tensor, times: dict[str, float],
                 scalars: dict[str, torch.Tensor] | None = None) -> None:
        """Device tensors (loss parts, and other ``scalars`` under their full names) are summed
        on the device: no sync here."""
        named = {f"loss/{k}": v for k, v in {"loss": loss, **parts}.items()}
        for k, v in {**named, **(scalars or {})}.items():
            v = v.detach().float()
            self.parts[k] = self.parts[k] + v if k in self.parts else v
        for k, v in times.items():
            self.times[k] += v
        self.steps += 1

    def log(self, step: int, extra: dict[str, float], counters: dict[str, dict[str, float]],
            sums: dict[str, float] | None = None) -> dict[str, float]:
        """Reduce across ranks, write, print; returns the scalars written.  ``counters`` (name ->
        count, names may differ between ranks) and ``sums`` are summed over ranks."""
        now = time.perf_counter()
        elapsed = max(1e-9, now - self.t_last)
        names = sorted(self.parts)
        means = mean_over_ranks([self.parts[k] / max(1, self.steps) for k in names])
        out = dict(zip(names, means))
        n = max(1, self.steps)
        for k, v in self.times.items():
            out[f"time/{k}_s"] = v / n
        step_time = elapsed / n
        out["time/step_s"] = step_time
        if "data_wait" in self.times:
            out["time/data_wait_fraction"] = self.times["data_wait"] / max(1e-9, elapsed)
        sps = self.global_batch * n / elapsed
        out["throughput/samples_per_s"] = sps
        out["throughput/samples_per_s_per_device"] = sps / self.world
        out["throughput/model_tflops_per_device"] = sps * self.flops / self.world / 1e12
        if self.peak:
            out["throughput/mfu"] = sps * self.flops / (self.peak * self.world)
        out["memory/host_rss_gb"] = host_rss_gb()
        if torch.cuda.is_available():
            out["memory/device_allocated_gb"] = torch.cuda.memory_allocated() / 2 ** 30
            out["memory/device_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
        out.update(extra)
        if sums:
            out.update(sum_over_ranks(sums))
        for group, counts in counters.items():
            reduced = sum_over_ranks(counts)
            out[f"{group}_total"] = float(sum(reduced.values()))
            for k, v in reduced.items():
                out[f"{group}/{k}"] = v
        if self.writer is not None:
            for k, v in out.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, **out}) + "\n")
        if self.rank == 0:
            eta = (self.max_steps - step) * step_time
            log.info("step %d/%d  loss %.4f  %s  %.1f samples/s  step %.3fs  ETA %s", step, self.max_steps,
                     out.get("loss/loss", float("nan")),
                     " ".join(f"{k[5:]} {v:.4f}" for k, v in out.items() if k.startswith("loss/") and k != "loss/loss"),
                     sps, step_time, _fmt_eta(eta))
        self.reset()
        self.t_last = time.perf_counter()
        return out

    def text(self, tag: str, body: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, "```\n" + body + "\n```", step)

    def hparams(self, hp: dict, metrics: dict) -> None:
        if self.writer is not None:
            self.writer.add_hparams(hp, metrics, run_name="hparams")

    def image(self, tag: str, img_chw, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, img_chw, step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt_eta(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def setup_logging(rank: int, run_dir: str | None = None) -> None:
    """Console on rank 0 (warnings on others), plus a per-rank log file in the run dir."""
    root = logging.getLogger("dide_scale")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(message)s", "%H:%M:%S")
    h = logging.StreamHandler()
    h.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    h.setFormatter(fmt)
    root.addHandler(h)
    quiet = logging.getLogger("dide_scale.file")  # what belongs in the log file but not on the console
    quiet.handlers.clear()
    quiet.propagate = False
    quiet.setLevel(logging.INFO)
    if run_dir:
        os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
        fh = logging.FileHandler(os.path.join(run_dir, "logs", f"rank{rank:03d}.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)
        quiet.addHandler(fh)
    root.propagate = False


def attention_figure(teacher_t2i, student_t2i, teacher_i2t, student_i2t, grid_hw, image=None) -> torch.Tensor:
    """A [3, H, W] image: for one probe sample, teacher vs student t2i attention of the
    [CLS] text query over the image patch grid (overlaid on the image), and i2t heatmaps
    (image queries x text keys), side by side.  Inputs are probabilities averaged over heads."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    gh, gw = grid_hw
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    for ax, m, title in ((axes[0], teacher_t2i, "teacher t2i"), (axes[1], student_t2i, "student t2i")):
        grid = m[1:].reshape(gh, gw).numpy()  # patch keys (skip image [CLS])
        if image is not None:
            ax.imshow(image.permute(1, 2, 0).numpy(), extent=(0, gw, gh, 0))
            ax.imshow(grid, cmap="inferno", alpha=0.6, extent=(0, gw, gh, 0))
        else:
            ax.imshow(grid, cmap="inferno")
        ax.set_title(title)
        ax.axis("off")
    for ax, m, title in ((axes[2], teacher_i2t, "teacher i2t"), (axes[3], student_i2t, "student i2t")):
        ax.imshow(m.numpy(), cmap="viridis", aspect="auto")
        ax.set_title(title)
        ax.set_xlabel("text key")
        ax.set_ylabel("image query")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    plt.close(fig)
    import numpy as np
    from PIL import Image
    arr = np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)
