"""Where am I?  The one module that reads the launcher's environment.

Supported: ``torchrun`` / ``deepspeed`` launcher (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), SLURM ``srun`` one task per GPU (SLURM_PROCID, SLURM_LOCALID,
SLURM_NTASKS, the first node of SLURM_JOB_NODELIST as rendezvous; submitit jobs are srun
tasks too), and a plain single process.  A half-set environment is an error, because
guessing the rest is how jobs hang at the rendezvous.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

from tqdm import tqdm

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What a training process tells its launcher (slurm/pretrain.sbatch, launch/submit.py) by its exit code
REQUEUE_EXIT_CODE = 42  # "checkpointed on a stop signal: requeue me"
BAD_STEPS_EXIT_CODE = 3
LEASE_LOST_EXIT_CODE = 4  # another job holds the run directory now: nothing more is written, no requeue


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self, visible_gpus: int = 0) -> None:
        """Write the torchrun-style variables that torch.distributed / DeepSpeed read.  With
        GPUs, LOCAL_RANK is the rank's device among the ones it can see (DeepSpeed selects
        its device by LOCAL_RANK; see ``device_index``)."""
        local = device_index(self.local_rank, visible_gpus) if visible_gpus else self.local_rank
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(local), WORLD_SIZE=str(self.world_size),
                          MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port),
                          LOCAL_SIZE=os.environ.get("LOCAL_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))


def device_index(local_rank: int, visible: int) -> int:
    """This rank's CUDA device among the ``visible`` ones.  Under ``srun --gpus-per-task=1`` or
    ``--gpu-bind`` each task sees only its own GPU, as device 0, whatever its local rank; with
    the node's GPUs all visible, the local rank picks one."""
    if visible <= 0:
        raise RuntimeError("no CUDA device is visible to this rank")
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} sees only {visible} GPUs (CUDA_VISIBLE_DEVICES="
                       f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): run one task per GPU, each seeing its "
                       "own GPU or all of the node's")


def rendezvous_port(job_id: int) -> int:
    """A job's rendezvous port: the same after a requeue (same job id), different for jobs
    sharing a node, and in 10000-29999, below Linux's ephemeral range (32768-60999), where
    an outgoing connection of some other process could already hold it."""
    return 10000 + job_id % 20000


def world_size() -> int:
    """Ranks in the initialised process group (1 without one)."""
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the initialised process group (0 without one)."""
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def control_group(timeout_s: float):
    """A CPU (gloo) group over every rank for the loop's votes and object exchanges, with the
    run's collective timeout (``new_group`` would otherwise give it torch's 30-minute default,
    whatever the default group's)."""
    import datetime

    import torch.distributed as dist
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


def max_over_ranks(value: int, group=None) -> int:
    """The largest ``value`` of any rank, on every rank (a MAX all-reduce on ``group``, the CPU
    gloo control group: no device sync)."""
    import torch
    import torch.distributed as dist
    if world_size() == 1:
        return int(value)
    t = torch.tensor([int(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    return max_over_ranks(int(bool(flag)), group) > 0


def all_ranks(flag: bool, group=None) -> bool:
    """True on every rank when ``flag`` is true on every rank."""
    return not any_rank(not flag, group)


def rank0_decides(value, group=None):
    """Rank 0's ``value`` (any picklable object) on every rank."""
    import torch.distributed as dist
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def lockstep_batches(loader, max_batches: int = 0, lockstep: bool = False, group=None, progress: bool = False,
                     desc: str = "eval"):
    """Yields (batch, counted) for each batch of ``loader`` (at most ``max_batches``).  In
    ``lockstep`` every rank yields as many batches as the rank with the most, so forward passes
    that gather parameters collectively (ZeRO-3) match: a rank out of data repeats its last
    batch, not counted.  One flag all-reduce per batch on ``group`` (the CPU control group)."""
    it = iter(tqdm(loader, desc=desc, disable=not progress, leave=False))
    last, i = None, 0
    while True:
        batch = None if max_batches and i >= max_batches else next(it, None)
        have = batch is not None
        if not (any_rank(have, group) if lockstep else have):
            return
        i += 1
        last = batch if have else last
        if last is None:
            raise RuntimeError("a rank has no evaluation batch while others have: the split has too few samples "
                               "(for retrieval, too few shards) for every rank to get one")
        yield last, have


def barrier(group=None) -> None:
    """Wait for every rank (a no-op without a process group)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def wait_for_rank0(group, timeout_s: float) -> None:
    """The other ranks wait until rank 0 is here, for up to ``timeout_s`` rather than the
    group's collective timeout: for when rank 0 alone has long work left (the final export)
    and the others nothing to do but wait.  ``group`` is a CPU (gloo) group, where a
    receive takes its own timeout (a barrier's would not); a no-op alone."""
    import datetime

    import torch
    import torch.distributed as dist
    if world_size() == 1:
        return
    token = torch.zeros(1)
    if rank() == 0:
        for r in range(1, world_size()):
            dist.isend(token, dst=r, group=group).wait()
    else:
        dist.irecv(token, src=0, group=group).wait(timeout=datetime.timedelta(seconds=timeout_s))


def gather_objects(value, group=None) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    import torch.distributed as dist
    if world_size() == 1:
        return [value]
    out: list = [None] * world_size()
    dist.all_gather_object(out, value, group=group)
    return out


def mean_over_ranks(values: list) -> list[float]:
    """The mean over ranks of each scalar tensor in ``values`` (one all-reduce), as floats."""
    import torch
    import torch.distributed as dist
    if not values:
        return []
    t = torch.stack([v.detach().float().reshape(()) for v in values])
    if world_size() > 1:
        dist.all_reduce(t)
        t /= world_size()
    return t.cpu().tolist()


def sum_over_ranks(counts: dict[str, float]) -> dict[str, float]:
    """Name -> count dicts summed over ranks (the names may differ between ranks)."""
    out: dict[str, float] = {}
    for part in gather_objects(dict(counts)):
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


def all_gather_nograd(x):
    """Every rank's ``x`` (same shape everywhere), concatenated in rank order, no gradient."""
    import torch
    import torch.distributed as dist
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def gather_with_grad(x):
    """Concatenate ``x`` from every rank; gradients flow back to each rank's own slice."""
    import torch
    if world_size() == 1:
        return x
    import torch.distributed.nn.functional as dnnf
    return torch.cat(dnnf.all_gather(x), dim=0)


def exchange_capacity(batch: int, world: int, factor: float = 2.0) -> int:
    """Rows one rank may ask of each other rank in ``gather_rows``: ``factor`` times the
    ``batch / world`` an even spread of requests would give (at least 1, at most ``batch``)."""
    import math
    return max(1, min(batch, math.ceil(factor * batch / world)))


def request_slots(owner, remote, world: int):
    """For each request (``owner`` rank per row, ``remote`` = not this rank), its position
    among this rank's requests to the same owner, in row order (0, 1, ...)."""
    import torch.nn.functional as F
    onehot = F.one_hot(owner, world) * remote[:, None].long()
    return (onehot.cumsum(0) - 1).gather(1, owner[:, None]).squeeze(1)


def gather_rows(tensors: list, idx, capacity: int | None = None) -> list:
    """Rows ``idx`` of each tensor, where ``idx`` holds global row indices (rank r's row i is
    ``r * B + i``, every rank's tensors having B rows), as ``negatives.mine_hard_negatives``
    returns them.  This rank's own rows are read in place; the others arrive in two
    ``all_to_all`` exchanges of static size (the requests, then the rows): ``capacity`` rows
    from each rank, which mining guarantees no request exceeds, so nothing is read back to
    the host.  Gradients of fetched rows flow back to the rank that owns them."""
    import math

    import torch
    import torch.distributed as dist
    import torch.distributed.nn.functional as dnnf
    b, world, me = tensors[0].shape[0], world_size(), rank()
    if world == 1:
        return [t[idx] for t in tensors]
    k = capacity or b
    owner, local_idx = idx // b, idx % b
    remote = owner != me
    slot = request_slots(owner, remote, world)
    pos = torch.where(remote, owner * k + slot, torch.full_like(slot, world * k))  # own rows: a dump slot
    ask = torch.zeros(world * k + 1, dtype=idx.dtype, device=idx.device).scatter_(0, pos, local_idx)[:-1]
    asked = torch.empty_like(ask)
    dist.all_to_all_single(asked, ask)  # row indices every rank asks of this one, k per rank
    out = []
    for t in tensors:
        is_bool = t.dtype == torch.bool
        src = t.to(torch.uint8) if is_bool else t
        send = src[asked].reshape(world * k, math.prod(t.shape[1:])).contiguous()
        recv = send.new_empty(send.shape)
        if send.requires_grad:
            recv = dnnf.all_to_all_single(recv, send)
        else:
            dist.all_to_all_single(recv, send)
        fetched = recv.reshape(world * k, *t.shape[1:])[torch.where(remote, owner * k + slot, 0)]
        got = torch.where(remote.view(-1, *[1] * (t.dim() - 1)), fetched, src[local_idx])
        out.append(got.bool() if is_bool else got)
    return out


def sizes_over_ranks(n: int, device, group=None) -> list[int]:
    """Every rank's ``n``, in rank order (one all-gather of a 1-element tensor on ``device``)."""
    import torch
    import torch.distributed as dist
    mine = torch.tensor([n], device=device)
    counts = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(counts, mine, group=group)
    return torch.cat(counts).tolist()  # one host sync for every rank's count


def gather_uneven(x, group=None):
    """Every rank's ``x`` concatenated in rank order, on every rank, where the ranks' row counts
    differ (other dimensions equal; a rank may have none).  Each rank sends its rows padded
    to the largest count, so the cost is one all-gather of that size plus one of the counts."""
    import torch
    import torch.distributed as dist
    if world_size() == 1:
        return x
    counts = sizes_over_ranks(x.shape[0], x.device, group)
    padded = x.new_zeros((max(max(counts), 1), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [padded.new_empty(padded.shape) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


def gather_newest(x, keep_last: int):
    """[P, M_r, C] on each rank -> the last ``keep_last`` of [P, sum_r M_r, C] in rank order.

    Only rows that survive are sent: rank r contributes its newest rows that fall inside the
    global tail (padded to the largest contribution for the all-gather), so each rank sends
    at most ``keep_last`` rows whatever the global token count."""
    import torch
    import torch.distributed as dist
    if world_size() == 1:
        return x[:, -keep_last:]
    counts = sizes_over_ranks(x.shape[1], x.device)
    keep = []
    later = 0  # rows of higher ranks, which are newer
    for c in reversed(counts):
        keep.append(max(0, min(c, keep_last - later)))
        later += c
    keep.reverse()
    mine = keep[rank()]
    padded = x.new_zeros(x.shape[0], max(max(keep), 1), x.shape[2])
    if mine:
        padded[:, :mine] = x[:, x.shape[1] - mine:]
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:, :k] for p, k in zip(parts, keep)], dim=1)


def init_evaluation_group(env: DistEnv, device: str | None = None, timeout_s: int = 1800):
    """A plain torch.distributed group for a job that only evaluates (``dide-eval`` under
    torchrun or srun; DeepSpeed is not needed): nccl with this rank's own GPU, else gloo; an
    existing group is joined as it is.  Returns (this rank's device, a gloo control group for
    host-side agreements or None for one process, whether the group was made here)."""
    import datetime

    import torch
    import torch.distributed as dist
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_gpu = gpus > 0 if device is None else device.startswith("cuda")
    if env.world_size == 1:
        return torch.device(device or ("cuda" if use_gpu else "cpu")), None, False
    timeout = datetime.timedelta(seconds=timeout_s)
    made = not dist.is_initialized()
    if made:
        env.export(gpus if use_gpu else 0)
        if use_gpu:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if use_gpu else "gloo", rank=env.rank, world_size=env.world_size,
                                timeout=timeout)
    dev = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    return dev, dist.new_group(backend="gloo", timeout=timeout), made


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list ('node[1-2]' -> 'node1')."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:  # fallback parser for 'prefix[1-3,7]'
        prefix, rest = head.split("[", 1)
        return prefix + rest.rstrip("]").split(",")[0].split("-")[0]
    return head


def detect(environ: dict | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    present = [v for v in TORCHRUN_VARS if v in env]
    if present:
        missing = [v for v in TORCHRUN_VARS if v not in env]
        if missing:
            raise RuntimeError(f"half-set distributed environment: {present} are set but {missing} are not; "
                               "launch with torchrun/deepspeed/srun or unset them")
        return DistEnv(int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"]), env["MASTER_ADDR"],
                       int(env["MASTER_PORT"]), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # inside an srun step (also submitit)
        need = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")
        missing = [v for v in need if v not in env]
        if missing:
            raise RuntimeError(f"incomplete SLURM step environment: {missing} missing")
        port = int(env.get("DIDE_MASTER_PORT", rendezvous_port(int(env["SLURM_JOB_ID"]))))
        addr = env.get("DIDE_MASTER_ADDR") or first_slurm_host(env["SLURM_JOB_NODELIST"])
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), int(env["SLURM_NTASKS"]), addr, port,
                       "srun")
    return DistEnv(0, 0, 1, "127.0.0.1", free_port(), "single")
