"""The only module that imports DeepSpeed.

* ``build_ds_config``: the run config and an optional DeepSpeed JSON reconciled in one
  place (batch arithmetic checked, clipping explicit, precision, ZeRO stage, offload),
  validated before any process group exists.
* ``init_distributed``: the process group (gloo on CPU, nccl on GPU) with the collective
  timeout from the config.
* ``build_engines``: the student as a DeepSpeed training engine; the teacher as its own
  ZeRO-3 inference engine when ``teacher.zero_stage`` resolves to 3 (each rank holds ~1/N of
  its parameters; small ones stay whole, ``teacher.param_persistence_threshold``), otherwise
  replicated on every rank, in eval mode and in the student's dtype.  The teacher never
  sees the optimizer.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, RunConfig
from .distributed import world_size

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
import deepspeed  # noqa: E402  (after DS_ACCELERATOR)
from deepspeed.accelerator import get_accelerator  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_ds_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config actually used (it is saved in the run directory)."""
    t = cfg.train
    base: dict = {}
    if t.ds_config:
        p = resolve_ds_config(t.ds_config)
        try:
            base = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"train.ds_config={t.ds_config!r} is not valid JSON: {e}") from None
    ds = copy.deepcopy(base)
    accum = cfg.grad_accum_steps(world_size)
    for key, ours in (("train_batch_size", t.global_batch_size), ("train_micro_batch_size_per_gpu",
                                                                  t.micro_batch_size),
                      ("gradient_accumulation_steps", accum)):
        if key in base and base[key] not in ("auto", ours):
            raise ConfigError(f"train.ds_config sets {key}={base[key]} but the run config gives {ours}; "
                              "remove it from the JSON (the run config owns batch arithmetic)")
        ds[key] = ours
    ds["gradient_clipping"] = float(t.grad_clip)
    zero = dict(base.get("zero_optimization", {}))
    if "stage" in zero and zero["stage"] != t.zero_stage:
        raise ConfigError(f"train.ds_config has zero_optimization.stage={zero['stage']} but "
                          f"train.zero_stage={t.zero_stage}")
    zero["stage"] = t.zero_stage
    if t.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds["zero_optimization"] = zero
    if t.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
                          "use train.precision=bf16 or fp32 here")
    ds["bf16"] = {"enabled": t.precision == "bf16"}
    fp16 = dict(base.get("fp16", {}))
    fp16.update(enabled=t.precision == "fp16")
    if t.precision == "fp16":
        fp16.setdefault("loss_scale", 0)  # dynamic
        fp16.setdefault("initial_scale_power", 16)
    ds["fp16"] = fp16
    if t.precision != "fp32":  # fp32 reductions and accumulation: bf16 sums over 16+ ranks lose digits
        ds.setdefault("communication_data_type", t.comm_dtype)
        if t.zero_stage >= 1:
            ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", t.grad_accum_dtype)
        elif accum > 1 and t.grad_accum_dtype != t.precision:
            raise ConfigError(f"train.zero_stage=0 accumulates gradients in {t.precision} (DeepSpeed has no "
                              f"{t.grad_accum_dtype} accumulation without ZeRO) over {accum} micro-batches: set "
                              f"train.zero_stage=1, or train.grad_accum_dtype={t.precision} to accept it")
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("steps_per_print", 10 ** 9)  # our own logger prints
    ds.setdefault("wall_clock_breakdown", False)
    validate_ds_config(ds, "train.ds_config" if t.ds_config else "the DeepSpeed config")
    return ds


def resolve_ds_config(name: str) -> Path:
    """A DeepSpeed JSON: the path as given (absolute, or relative to the working directory),
    else one of the shipped ``ds_configs/`` by file name, from wherever the package is."""
    p = Path(name)
    if p.exists():
        return p
    from importlib.resources import files
    shipped = files("dide_scale.ds_configs") / (p.name if p.suffix == ".json" else f"{p.name}.json")
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(f.name for f in files("dide_scale.ds_configs").iterdir() if f.name.endswith(".json"))
    raise ConfigError(f"train.ds_config={name!r} does not exist (shipped: {names})")


def validate_ds_config(ds: dict, where: str) -> None:
    """Combinations DeepSpeed cannot run, caught before any process starts."""
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if zero.get("offload_param") and stage != 3:
        raise ConfigError(f"{where}: zero_optimization.offload_param needs stage 3 (got {stage}); "
                          "set train.zero_stage=3 or remove the offload")
    if zero.get("offload_optimizer") and stage == 0:
        raise ConfigError(f"{where}: zero_optimization.offload_optimizer needs stage >= 1")
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{where}: bf16 and fp16 are both enabled; choose one with train.precision")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage={stage} must be 0-3")
    mb, acc, gb = (ds.get(k) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                       "train_batch_size"))
    if all(isinstance(v, int) for v in (mb, acc, gb)) and gb % (mb * acc):
        raise ConfigError(f"{where}: train_batch_size={gb} is not micro {mb} x accumulation {acc} x world size")


def init_distributed(env, timeout_s: int) -> None:
    """Process group for this rank (gloo on CPU, nccl on GPU)."""
    import torch.distributed as dist
    if dist.is_initialized():
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    env.export(gpus)
    backend = "nccl" if gpus else "gloo"
    if gpus:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # this rank's device among the visible ones
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.world_size == 1:
        # one process needs no rendezvous: an in-memory store, instead of a TCP port that another
        # process may take between choosing it and listening on it
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=timeout, rank=env.rank, world_size=env.world_size)


def device() -> torch.device:
    return torch.device(get_accelerator().device_name(), get_accelerator().current_device()) \
        if torch.cuda.is_available() else torch.device("cpu")


def synchronize() -> None:
    get_accelerator().synchronize()


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_params: list[nn.Parameter],
                 head_lr_mult: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings tables' norms, position/cls tokens and
    the logit scale; the fusion + task head get ``head_lr_mult`` x lr (the paper's VQA x10)."""
    head_ids = {id(p) for p in head_params}
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or name.endswith(("cls_token", "pos_embed", "logit_scale"))
        groups.setdefault((id(p) in head_ids, no_decay), []).append(p)
    return [{"params": ps, "lr": lr * (head_lr_mult if head else 1.0),
             "weight_decay": 0.0 if nd else weight_decay} for (head, nd), ps in groups.items()]


def lr_lambda(max_steps: int, warmup_fraction: float, min_ratio: float):
    """Linear warm-up then linear decay, in optimizer steps (correct under accumulation)."""
    warm = int(max_steps * warmup_fraction)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, max_steps - warm)
        return max(min_ratio, 1.0 - (1.0 - min_ratio) * frac)
    return f


def optimizer_offloaded(ds_config: dict) -> bool:
    """Whether ZeRO keeps the optimizer state (and steps it) on the CPU or NVMe."""
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def adamw(groups: list[dict], o, offloaded: bool) -> torch.optim.Optimizer:
    """AdamW over ``groups``.  With the optimizer offloaded, DeepSpeed's vectorised CPU Adam
    (a C++ op built on first use), which ZeRO-Offload requires of a client optimizer: torch's
    AdamW would step the CPU-resident fp32 master weights several times slower."""
    if offloaded:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


@dataclass
class Engines:
    student: "deepspeed.DeepSpeedEngine"
    teacher: nn.Module | None
    dtype: torch.dtype
    device: torch.device
    teacher_partitioned: bool

    @property
    def student_module(self) -> nn.Module:
        return self.student.module


def build_engines(cfg: RunConfig, ds_config: dict, student: nn.Module, teacher: nn.Module | None) -> Engines:
    o = cfg.optim
    groups = param_groups(student, o.lr, o.weight_decay, student.head_parameters(), o.head_lr_mult)
    optimizer = adamw(groups, o, offloaded=optimizer_offloaded(ds_config))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.max_steps, o.warmup_fraction, o.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    dtype = DTYPES[cfg.train.precision]
    dev = engine.device if hasattr(engine, "device") else device()
    t_engine, partitioned = None, False
    if teacher is not None:
        teacher.eval().requires_grad_(False)
        if cfg.teacher_partitioned():
            t_cfg = {"train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
                     "gradient_accumulation_steps": 1,
                     "train_batch_size": ds_config["train_micro_batch_size_per_gpu"] * world_size(),
                     "zero_optimization": {"stage": 3,
                                           "stage3_param_persistence_threshold":
                                               cfg.teacher.param_persistence_threshold,
                                           **({"offload_param": {"device": "cpu"}} if cfg.train.offload else {})},
                     "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16},
                     "steps_per_print": 10 ** 9}
            t_engine, _, _, _ = deepspeed.initialize(model=teacher, config=t_cfg)
            t_engine.eval()
            partitioned = True
        else:
            t_engine = teacher.to(device=dev, dtype=dtype)
    return Engines(engine, t_engine, dtype, dev, partitioned)


def local_param_fraction(module: nn.Module) -> float:
    """Fraction of a (possibly ZeRO-3 partitioned) module's parameters held on this rank."""
    held = total = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else n
    return held / max(1, total)


def partitioned_params(module: nn.Module) -> tuple[int, int]:
    """(parameter tensors ZeRO-3 partitions across the ranks, all parameter tensors): a
    partitioned one is whole only inside its module's forward; those under
    ``stage3_param_persistence_threshold`` elements stay whole on every rank."""
    params = list(module.parameters())
    return sum(1 for p in params if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False)), len(params)


def grad_norm(engine) -> float | None:
    """Global gradient norm of the last optimizer step (None when DeepSpeed has none)."""
    g = engine.get_global_grad_norm()
    if g is None:
        return None
    g = float(g)
    return g if math.isfinite(g) else float("nan")


def loss_scale(engine) -> float:
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
    return float(scale) if scale is not None else 1.0


def consolidated_state_dict(checkpoint_dir: str | os.PathLike, tag: str) -> dict:
    """Full fp32 student weights from a sharded checkpoint (any ZeRO stage, any world size).
    ZeRO-1 under bf16 with fp32 gradient accumulation runs DeepSpeed's BF16 optimizer, whose
    checkpoints its fp32 consolidation cannot read: those go through its universal
    conversion, which keeps every parameter's fp32 master weights."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    d = Path(checkpoint_dir) / tag
    if not any(d.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    zero = convert_to_universal(checkpoint_dir, tag, Path(checkpoint_dir) / "universal") / "zero"
    model = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    sd = {k: v.float() for k, v in model["module"].items() if k in set(model.get("buffer_names", []))}
    for p in sorted(zero.iterdir()):
        if (p / "fp32.pt").is_file():
            sd[p.name] = torch.load(p / "fp32.pt", map_location="cpu", weights_only=False)["param"]
    return sd


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A full copy of a (possibly ZeRO-3 partitioned) module's parameters, on every rank."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}


def convert_to_universal(checkpoint_dir: str | os.PathLike, tag: str, out_dir: str | os.PathLike) -> Path:
    """DeepSpeed's universal checkpoint conversion (for resuming at another world size).

    Runs ``deepspeed.checkpoint.ds_to_universal`` in a subprocess (it forks workers) and
    returns the directory holding the converted tag."""
    import subprocess
    import sys
    out = Path(out_dir) / tag
    if (out / "CONVERTED").exists():
        return out
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(Path(checkpoint_dir) / tag), "--output_folder", str(out), "--num_extract_workers", "1",
           "--num_merge_workers", "1", "--inject_missing_state"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"universal checkpoint conversion of {tag} failed:\n{res.stdout[-2000:]}\n"
                           f"{res.stderr[-2000:]}")
    (out / "CONVERTED").write_text("ok")
    return out


def load_universal(engine, universal_root: str | os.PathLike, tag: str, load_optimizer: bool = True):
    """Load a converted universal checkpoint into ``engine`` (any world size)."""
    engine._config.load_universal_checkpoint = True
    try:
        return engine.load_checkpoint(str(universal_root), tag=tag, load_optimizer_states=load_optimizer,
                                      load_lr_scheduler_states=load_optimizer)
    finally:
        engine._config.load_universal_checkpoint = False
