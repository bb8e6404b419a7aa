"""A real SLURM cluster on localhost for the launcher tests: munged + slurmctld + two
slurmd daemons emulating the nodes ``node1`` and ``node2`` (both 127.0.0.1).

Everything lives in one folder: a private munge key and socket, ``slurm.conf`` (used
through ``SLURM_CONF``), state, spool, pid and log files.  Ports are picked free at start,
so the cluster does not collide with another SLURM on the machine.  Settings that
matter: the nodes are emulated by one slurmd each (``slurmd -N nodeN``, distinct ports),
``cred_expire`` and ``sched_interval=1`` bring a requeued job back in seconds,
``KillOnBadExit=1`` is what production clusters often set, and daemons are started
directly (Debian's package scripts cannot start services here).

    cluster = SlurmCluster(tmp_dir)
    why = cluster.start()          # None, or why there is no cluster (the caller skips)
    job = cluster.sbatch(["-N2", "script.sbatch"], env=cluster.env())
    cluster.wait_state(job, {"COMPLETED"}, timeout=120)
    cluster.stop()
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NODES = ("node1", "node2")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "munged")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
HOSTS_LINE = "127.0.0.1 " + " ".join(NODES) + "  # dide_scale test cluster\n"


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                       if os.access(p, os.X_OK)), None)


def install_packages() -> str | None:
    """apt-get install the daemons if missing.  None on success, else the reason."""
    if all(_which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and cannot be installed here (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=180, check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env,
                       capture_output=True, timeout=300, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        out = getattr(e, "stderr", b"") or b""
        return f"apt-get install {' '.join(PACKAGES)} failed: {e} {out.decode(errors='replace')[-500:]}"
    missing = [b for b in BINARIES if not _which(b)]
    return f"installed, but still missing: {missing}" if missing else None


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ensure_hosts() -> str | None:
    """node1/node2 must resolve (to 127.0.0.1); adds one line to /etc/hosts if needed."""
    try:
        if all(socket.gethostbyname(n) == "127.0.0.1" for n in NODES):
            return None
    except OSError:
        pass
    try:
        with open("/etc/hosts", "a") as f:
            f.write(HOSTS_LINE)
    except OSError as e:
        return f"cannot make {NODES} resolve: /etc/hosts not writable ({e})"
    try:
        ok = all(socket.gethostbyname(n) == "127.0.0.1" for n in NODES)
    except OSError:
        ok = False
    return None if ok else f"{NODES} still do not resolve to 127.0.0.1 after editing /etc/hosts"


class SlurmCluster:
    def __init__(self, root: Path, cpus_per_node: int = 2, cred_expire: int = 10):
        self.root = Path(root)
        self.cpus = cpus_per_node
        self.cred_expire = cred_expire
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.socket = self.munge_dir / "munge.socket"
        self.procs: list[tuple[str, int]] = []  # (name, pid) of the daemons we started

    # -- environment -----------------------------------------------------------------
    def env(self, **extra) -> dict:
        """os.environ + SLURM_CONF, minus any SLURM_* of an enclosing job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env=kw.pop("env", None) or self.env(), capture_output=True, text=True,
                              timeout=timeout, check=check, **kw)

    # -- start / stop ----------------------------------------------------------------
    def start(self, timeout: float = 30) -> str | None:
        """Install if needed and start munged, slurmctld, slurmd x2.  None, or the reason."""
        why = install_packages() or ensure_hosts()
        if why:
            return why
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._write_conf()
            self._spawn("slurmctld", [_which("slurmctld"), "-c", "-f", str(self.conf)])
            for n in NODES:
                self._spawn(f"slurmd-{n}", [_which("slurmd"), "-c", "-f", str(self.conf), "-N", n])
            deadline = time.time() + timeout
            while time.time() < deadline:
                out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
                states = dict(line.split() for line in out.splitlines() if line.strip())
                if all(states.get(n) == "idle" for n in NODES):
                    return None
                time.sleep(0.5)
            return f"SLURM nodes did not become idle in {timeout} s: {states}\n{self.logs()}"
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            return f"could not start the SLURM cluster: {e}\n{self.logs()}"

    def _start_munge(self) -> None:
        self.munge_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(self.munge_dir, 0o755)
        key = self.munge_dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        pid = self.munge_dir / "munged.pid"
        subprocess.run([_which("munged"), "--force", f"--socket={self.socket}", f"--key-file={key}",
                        f"--pid-file={pid}", f"--log-file={self.munge_dir / 'munged.log'}",
                        f"--seed-file={self.munge_dir / 'munged.seed'}"], check=True, capture_output=True,
                       timeout=30)
        self.procs.append(("munged", int(pid.read_text().split()[0])))
        subprocess.run(f"munge -n --socket={self.socket} | unmunge --socket={self.socket}", shell=True,
                       check=True, capture_output=True, timeout=30)

    def _write_conf(self) -> None:
        state = self.root / "state"
        for d in ("state", *(f"spool/{n}" for n in NODES)):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = free_ports(1 + len(NODES))
        nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
                          f"RealMemory=4000 State=UNKNOWN" for n, p in zip(NODES, node_ports))
        self.conf.write_text(f"""\
ClusterName=dide
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire={self.cred_expire}
StateSaveLocation={state}
SlurmdSpoolDir={self.root}/spool/%n
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.root}/jobcomp.txt
SchedulerParameters=sched_interval=1,bf_interval=1
EnforcePartLimits=ALL
KillWait=10
KillOnBadExit=1
MinJobAge=600
SlurmdTimeout=60
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        # -D: stay in the foreground, so the pid is ours and stop() ends exactly it
        p = subprocess.Popen([*cmd, "-D"], env=self.env(), stdout=subprocess.DEVNULL,
                             stderr=open(self.root / f"{name}.stderr", "w"), start_new_session=True)
        self.procs.append((name, p.pid))
        time.sleep(0.3)
        if p.poll() is not None:
            raise RuntimeError(f"{name} exited with {p.returncode}")

    def stop(self) -> None:
        """Cancel remaining jobs, then stop our daemons (by pid, newest first)."""
        if self.conf.exists():
            self.run("scancel", "--user", str(os.getuid()), check=False)
        for name, pid in reversed(self.procs):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                    if name != "munged":  # our own child: reap it
                        os.waitpid(pid, os.WNOHANG)
                except (ProcessLookupError, ChildProcessError):
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.procs.clear()

    def logs(self, tail: int = 20) -> str:
        out = []
        for p in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.stderr")):
            lines = p.read_text(errors="replace").splitlines()[-tail:]
            if lines:
                out.append(f"--- {p.name}\n" + "\n".join(lines))
        return "\n".join(out)

    # -- jobs ------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | os.PathLike | None = None) -> str:
        r = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd, check=False)
        if r.returncode:
            raise RuntimeError(f"sbatch failed ({r.returncode}): {r.stderr}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once the controller forgot the job)."""
        r = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if r.returncode:
            return {}
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", r.stdout))

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_state(self, job_id: str, states: set[str], timeout: float, poll: float = 0.5) -> dict:
        """Wait until the job is in one of ``states``; a finished job in another state, or
        the timeout, raises with the job's record and the daemons' logs."""
        deadline = time.time() + timeout
        info: dict = {}
        while time.time() < deadline:
            info = self.job(job_id)
            st = info.get("JobState")
            if st in states:
                return info
            if st in FINISHED - states:
                raise AssertionError(f"job {job_id} ended {st} while waiting for {states}: {info}")
            time.sleep(poll)
        raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {info}\n{self.logs()}")
