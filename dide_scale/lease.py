"""One job per run directory: a lease file that expires unless it is renewed.

Two jobs writing one ``train.output_dir`` (a requeue racing a job still alive on a lost
node, a typo) would interleave checkpoints and move ``latest`` under each other.  The first
job takes ``RUN/lease.json`` and renews it every ``ttl / 3`` seconds from a background
thread; a second job finds it held and exits at once, naming the holder.  ``flock`` is not
reliable on NFS or Lustre, so the lease relies only on operations that are atomic there:

* taking a free lease is ``link(tmp, lease)``, which fails if the file exists (the classic
  NFS-safe lock);
* taking over a stale lease first renames it away (``rename`` of one name succeeds for one
  process only), then links a new one.

A lease is stale when its holder is known dead (same host, no such pid), when it was not
renewed for ``ttl`` seconds (the holder was SIGKILLed or its node was lost; node clocks are
assumed to agree to well within ``ttl``, as NTP keeps them), or when the new job is the same
SLURM job after a requeue (its previous incarnation is gone by then).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("dide_scale")
LEASE = "lease.json"


class LeaseHeld(RuntimeError):
    """Another live job holds the run directory."""


class LeaseLost(RuntimeError):
    """Another job took the run directory over while this one ran (this one's renewals
    stopped for longer than the TTL: a hung filesystem, a frozen node)."""


@dataclass
class Holder:
    token: str
    host: str
    pid: int
    slurm_job_id: str | None
    since: float
    renewed: float
    ttl_s: float

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id}" if self.slurm_job_id else ""
        since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.since))
        return (f"host {self.host}, pid {self.pid}{job}, since {since}"
                f" (renewed {time.time() - self.renewed:.0f} s ago, expires after {self.ttl_s:.0f} s without renewal)")


def _slurm_job_id(environ=os.environ) -> str | None:
    """The SLURM job this process belongs to (kept across requeues), if any."""
    if "SLURM_ARRAY_JOB_ID" in environ:
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ.get('SLURM_ARRAY_TASK_ID')}"
    return environ.get("SLURM_JOB_ID")


def read_holder(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, OSError):  # half-written or foreign: treat as stale
        return Holder("?", "?", -1, None, 0.0, 0.0, 0.0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(h: Holder, me: Holder, now: float | None = None) -> str | None:
    """Why ``h`` no longer holds the lease against ``me`` (None: it does)."""
    now = time.time() if now is None else now
    if h.token == me.token:
        return "ours"
    if me.slurm_job_id and h.slurm_job_id == me.slurm_job_id:
        return f"the same SLURM job {h.slurm_job_id} (requeued)"
    if h.host == me.host and not _pid_alive(h.pid):
        return f"its process {h.pid} on this host is gone"
    if now - h.renewed > h.ttl_s:
        return f"not renewed for {now - h.renewed:.0f} s (> {h.ttl_s:.0f} s)"
    return None


class RunLease:
    """Hold ``run_dir``'s lease for the life of a job (rank 0 only).

    ``acquire()`` raises :class:`LeaseHeld` naming the live holder; ``release()`` removes the
    lease if it is still ours.  Renewal runs in a daemon thread; a renewal that finds the
    lease in another job's hands sets ``lost`` (why), and the trainer then stops without
    writing another checkpoint."""

    def __init__(self, run_dir: str | os.PathLike, ttl_s: float = 300.0):
        self.dir = Path(run_dir)
        self.path = self.dir / LEASE
        now = time.time()
        self.me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), _slurm_job_id(), now, now, float(ttl_s))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: str | None = None
        self.lost: str | None = None

    def _write_new(self) -> bool:
        """Create the lease if no file exists (atomic on NFS via link)."""
        tmp = self.dir / f".{LEASE}.{self.me.token}"
        tmp.write_text(json.dumps(asdict(self.me)))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> "RunLease":
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._write_new():
                break
            holder = read_holder(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            why = stale_reason(holder, self.me)
            if why is None:
                raise LeaseHeld(f"{self.dir} is in use by another job ({holder.describe()}); wait for it, stop it, or "
                                f"choose another train.output_dir (a lease not renewed for {holder.ttl_s:.0f} s is "
                                "taken over)")
            try:  # only one process can rename the stale lease away
                os.rename(self.path, self.dir / f".{LEASE}.stale.{self.me.token}")
            except FileNotFoundError:
                continue
            (self.dir / f".{LEASE}.stale.{self.me.token}").unlink(missing_ok=True)
            self.took_over = f"{holder.describe()}: {why}"
        else:
            raise LeaseHeld(f"{self.dir}: could not take the lease after 5 tries (another job racing for it)")
        self._thread = threading.Thread(target=self._renew_loop, name="dide-lease", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.me.ttl_s / 3):
            try:
                self.renew()
            except OSError as e:  # a transient filesystem error: the next renewal may succeed
                log.warning("could not renew the run-directory lease: %s", e)

    def renew(self) -> None:
        held = read_holder(self.path)
        if held is None or held.token != self.me.token:
            self.lost = f"the run-directory lease was taken by another job ({held.describe() if held else 'removed'})"
            log.error("%s", self.lost)
            self._stop.set()
            return
        self.me.renewed = time.time()
        tmp = self.dir / f".{LEASE}.{self.me.token}"
        tmp.write_text(json.dumps(asdict(self.me)))
        os.replace(tmp, self.path)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = read_holder(self.path)
        if held is not None and held.token == self.me.token:
            self.path.unlink(missing_ok=True)
