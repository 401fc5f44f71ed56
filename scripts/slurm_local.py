"""A one-node SLURM cluster on this machine, for trying sweeps and for the tests marked `slurm`.

    python scripts/slurm_local.py start      # writes slurm.conf, starts munged, slurmctld, slurmd; waits for idle
    export SLURM_CONF=/tmp/perpneg3d-slurm/slurm.conf   # (start prints it) then sbatch, sinfo, train.py -m ... work
    python scripts/slurm_local.py status
    python scripts/slurm_local.py stop       # stops exactly the daemons start started (by their pids)

Everything lives in one state folder (--dir, default $TMPDIR/perpneg3d-slurm): the config, the munge key
and socket, the daemons' pid and log files, the spool. Needs Debian's `slurmd slurmctld slurm-client munge`
packages and root (slurmd starts jobs as their users). Requeued jobs wait `--requeue-delay` seconds (SLURM's
default is 120 s, through AuthInfo's cred_expire) before they may run again.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
NEEDED = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "sinfo": "slurm-client",
          "sbatch": "slurm-client"}
DEFAULT_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "perpneg3d-slurm"


class SlurmUnavailable(Exception):
    """SLURM cannot start here; the message is one line saying what is missing."""


def missing_reason() -> str | None:
    """One line on what stops a local SLURM from starting here, or None."""
    absent = sorted({pkg for tool, pkg in NEEDED.items() if shutil.which(tool, path=_sbin_path()) is None})
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} missing): as root, "
                f"apt-get install slurmd slurmctld slurm-client munge")
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd starts jobs as their users): run as root, or use hydra/launcher=submitit_local"
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _tool(name: str) -> str:
    return shutil.which(name, path=_sbin_path()) or name


def machine() -> dict:
    """This machine as slurmd sees it: hostname, CPUs, memory (MB, less 1 GB for the system)."""
    mem_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")).split()[1])
    return dict(host=socket.gethostname().split(".")[0], cpus=os.cpu_count() or 1, memory_mb=max(mem_kb // 1024 - 1024, 512))


def slurm_conf(state: Path, host: str, cpus: int, memory_mb: int, requeue_delay: int, port: int) -> str:
    """slurm.conf for one node that runs batch jobs as root-started processes, no accounting database."""
    return "\n".join([
        "ClusterName=perpneg3d-local",
        f"SlurmctldHost={host}",
        f"SlurmctldPort={port}",
        f"SlurmdPort={port + 1}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # socket: our munged; cred_expire: how long a requeued job waits before it may run again (default 120 s)
        f"AuthInfo=socket={state / 'munge.socket'},cred_expire={requeue_delay}",
        f"StateSaveLocation={state / 'ctld'}",
        f"SlurmdSpoolDir={state / 'spool'}",
        f"SlurmctldPidFile={state / 'slurmctld.pid'}",
        f"SlurmdPidFile={state / 'slurmd.pid'}",
        f"SlurmctldLogFile={state / 'slurmctld.log'}",
        f"SlurmdLogFile={state / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        "MinJobAge=30",
        "KillWait=10",
        "SchedulerParameters=sched_interval=2",
        f"NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def env(state: Path) -> dict:
    return dict(os.environ, SLURM_CONF=str(state / "slurm.conf"), PATH=_sbin_path())


def alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if alive(pid) else None


def running(state: Path) -> dict[str, int]:
    """The daemons of this state folder that are alive: name -> pid (from their pid files)."""
    pids = {name: _pid(state / f"{name}.pid") for name in DAEMONS}
    return {name: pid for name, pid in pids.items() if pid is not None}


def node_state(state: Path) -> str:
    done = subprocess.run([_tool("sinfo"), "-h", "-N", "-o", "%t"], env=env(state), capture_output=True, text=True,
                          timeout=30)
    return done.stdout.strip() if done.returncode == 0 else f"sinfo failed: {done.stderr.strip()}"


def _run(args: list[str], state: Path) -> None:
    done = subprocess.run(args, env=env(state), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        name = Path(args[0]).name
        log = state / f"{name}.log"
        tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
        raise SlurmUnavailable(f"{name} did not start: {(done.stderr.strip() or ' '.join(tail) or '?').splitlines()[0]}")


def start(state: Path, requeue_delay: int = 5, port: int = 6917, timeout_s: float = 60) -> dict:
    """Start munged, slurmctld and slurmd for `state`; wait until the node is idle. Returns their pids."""
    reason = missing_reason()
    if reason:
        raise SlurmUnavailable(reason)
    if requeue_delay < 5:  # slurmctld ignores a smaller cred_expire (logs "invalid") and keeps 120 s
        raise SlurmUnavailable(f"--requeue-delay={requeue_delay}: SLURM's minimum is 5 seconds")
    alive = running(state)
    if alive:
        raise SlurmUnavailable(f"a local SLURM of {state} is already running (pids {alive}): "
                               f"python scripts/slurm_local.py stop --dir {state}")
    for sub in ("ctld", "spool"):
        shutil.rmtree(state / sub, ignore_errors=True)
        (state / sub).mkdir(parents=True)
    state.chmod(0o755)
    key = state / "munge.key"
    if not key.is_file():
        key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    info = machine()
    (state / "slurm.conf").write_text(slurm_conf(state, requeue_delay=requeue_delay, port=port, **info))
    _run([_tool("munged"), "--force", f"--socket={state / 'munge.socket'}", f"--key-file={key}",
          f"--pid-file={state / 'munged.pid'}", f"--log-file={state / 'munged.log'}",
          f"--seed-file={state / 'munged.seed'}"], state)
    _run([_tool("slurmctld"), "-f", str(state / "slurm.conf")], state)
    _run([_tool("slurmd"), "-f", str(state / "slurm.conf")], state)
    deadline = time.time() + timeout_s
    status = ""
    while time.time() < deadline:
        status = node_state(state)
        if status == "idle":
            return running(state)
        time.sleep(0.5)
    stop(state)
    raise SlurmUnavailable(f"the node did not become idle within {timeout_s:.0f} s (sinfo: {status}); "
                           f"see {state}/slurmctld.log and slurmd.log")


def stop(state: Path, timeout_s: float = 30) -> list[str]:
    """SIGTERM each daemon of this state folder by the pid it wrote, wait for it to exit; returns their names."""
    stopped = []
    for name in reversed(DAEMONS):  # slurmd, slurmctld, then munged (the others authenticate through it)
        pid = _pid(state / f"{name}.pid")
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + timeout_s
        while time.time() < deadline and alive(pid):  # by the process, not its pid file (removed before it exits)
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        stopped.append(name)
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state folder (config, key, logs, spool)")
    parser.add_argument("--requeue-delay", type=int, default=5,
                        help="seconds a requeued job waits (SLURM's default 120; its minimum 5)")
    parser.add_argument("--port", type=int, default=6917, help="slurmctld's port (slurmd uses the next one)")
    args = parser.parse_args(argv)
    state = args.dir.resolve()
    try:
        if args.action == "start":
            state.mkdir(parents=True, exist_ok=True)
            pids = start(state, args.requeue_delay, args.port)
            print(f"local SLURM up: node {machine()['host']} idle, partition debug (pids {pids})")
            print(f"export SLURM_CONF={state / 'slurm.conf'}")
        elif args.action == "stop":
            stopped = stop(state)
            print(f"stopped {', '.join(stopped)}" if stopped else f"no local SLURM of {state} is running")
        else:
            alive = running(state)
            print(f"running: {alive or 'nothing'}" + (f"; node {node_state(state)}" if "slurmctld" in alive else ""))
    except SlurmUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
