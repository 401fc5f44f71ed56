"""Sweeps on a real SLURM: a one-node cluster started here (scripts/slurm_local.py), the toy preset through
hydra/launcher=submitit_slurm, preemption with requeue and exact resume, a bad job among good ones.

Marked `slurm`; skipped with slurm_local's one line where SLURM cannot start (not installed, not root)."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY_TOY, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("slurm_local", ROOT / "scripts" / "slurm_local.py")
slurm_local = importlib.util.module_from_spec(spec)
spec.loader.exec_module(slurm_local)

pytestmark = pytest.mark.slurm
TINY = [o for o in TINY_TOY if o != "experiment=toy"] + ["~export", "evaluate_janus=false", "trainer.turntable_frames=2"]
LAUNCHER = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.gpus_per_node=0", "hydra.launcher.mem_gb=4"]


def free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_local.missing_reason()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    started = time.time()
    pids = slurm_local.start(state, requeue_delay=5, port=free_port_pair())
    print(f"local SLURM up in {time.time() - started:.1f} s: {pids}")
    env = subprocess_env(SLURM_CONF=str(state / "slurm.conf"), PYTHONUNBUFFERED="1")
    yield dict(state=state, env=env, pids=pids)
    slurm_local.stop(state)
    for name, pid in pids.items():  # exactly the daemons it started are gone
        assert not slurm_local.alive(pid), f"{name} (pid {pid}) still runs"
    assert slurm_local.running(state) == {}


def sweep(cluster, out: Path, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *args, *LAUNCHER, f"out_dir={out}"], cwd=ROOT,
                          env=cluster["env"], capture_output=True, text=True, timeout=timeout)


def job_logs(sweep_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_log.*")))


def test_two_job_toy_sweep(cluster, tmp_path):
    done = sweep(cluster, tmp_path, "seed=0,1", "experiment=toy", *TINY, "trainer.max_steps=60")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "job states are read from squeue" in done.stderr + done.stdout
    assert "Bypassing sacct error" not in done.stderr + done.stdout  # the accounting warning is gone
    sweep_dir = next((tmp_path / "multirun").iterdir())
    for job in ("0", "1"):
        assert (sweep_dir / job / "metrics.json").is_file() and (sweep_dir / job / "ckpts" / "step_0000060.ckpt").is_file()
    collected = subprocess.run([sys.executable, str(ROOT / "scripts" / "collect_sweep.py"), str(sweep_dir)], cwd=ROOT,
                               env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert collected.returncode == 0, collected.stderr
    rows = list(csv.DictReader(open(sweep_dir / "sweep.csv")))
    assert sorted(r["seed"] for r in rows) == ["0", "1"]


def final_table(run: Path) -> torch.Tensor:
    from perpneg3d.training.checkpoint import latest_valid_checkpoint

    state = latest_valid_checkpoint(run)[1]
    return next(v for k, v in state["geometry"].items() if k.endswith("embeddings"))


def progress_step(run: Path) -> int:
    try:
        return int(json.loads((run / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError):  # not written yet, or being replaced
        return -1


def wait_for(what: str, check, proc: subprocess.Popen, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {proc.returncode}) while waiting for {what}: "
                                 f"{proc.stderr.read()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_preempted_job_is_requeued_and_resumes_exactly(cluster, tmp_path):
    """SLURM's warning signal (USR2, as `--signal` sends it before a time limit and a preemption does), sent with
    scancel twice once the job has trained 100 steps past its start: each time the job checkpoints, submitit
    requeues it and it resumes from that checkpoint. The result equals the same run uninterrupted (one thread, as
    the job's cpus_per_task=1 gives). The test sends the signal itself, after the job's first progress report, so
    it never lands while the job is still starting (SLURM may send a time limit's signal up to a minute early)."""
    run = ["seed=0", "experiment=toy", *TINY, "trainer.max_steps=800", "trainer.ckpt_every=100000",
           "trainer.val_every=100000"]
    reference = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *run, "threads=1",
                                  f"out_dir={tmp_path}", "name=reference"], cwd=ROOT, env=cluster["env"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.time()
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *run, *LAUNCHER, f"out_dir={tmp_path}",
                             "hydra.launcher.timeout_min=30", "hydra.launcher.max_num_timeout=5"], cwd=ROOT,
                            env=cluster["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = tmp_path / "multirun"
    run_dir = wait_for("the job's folder", lambda: next(job.glob("*/0"), None), proc)
    signalled = []
    for n in range(2):
        since = signalled[-1] if signalled else 0
        step = wait_for(f"100 steps after {since}", lambda: (s := progress_step(run_dir)) >= since + 100 and s, proc)
        job_id = subprocess.run(["squeue", "--noheader", "--format=%i", "--states=RUNNING"], env=cluster["env"],
                                capture_output=True, text=True, timeout=30).stdout.split()
        assert len(job_id) == 1, job_id
        subprocess.run(["scancel", "--signal=USR2", job_id[0]], env=cluster["env"], check=True, timeout=30)
        signalled.append(step)
        if n == 0:  # the requeued job's first progress report comes from its resumed segment
            wait_for("the requeued job", lambda: "requeued job: resuming" in job_logs(run_dir.parent), proc)
    out, err = proc.communicate(timeout=600)
    seconds = time.time() - started
    assert proc.returncode == 0, err[-3000:]
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]
    log = job_logs(run_dir.parent)
    stopped = [int(s) for s in re.findall(r"stopped at step (\d+); checkpoint", log)]
    resumed = [int(s) for s in re.findall(r"requeued job: resuming from \S+/step_(\d+)\.ckpt", log)]
    print(f"preemption: signalled at steps {signalled}, segments ended at {stopped}, resumed from {resumed}, "
          f"{seconds:.0f} s")
    assert len(resumed) == 2 and resumed == stopped  # each segment resumed from the previous one's last checkpoint
    assert all(a <= b < a + 50 for a, b in zip(signalled, stopped)) and stopped[-1] < 800  # stopped at the next step
    err_log = "\n".join(p.read_text() for p in (run_dir.parent / ".submitit").glob("*/*_log.err"))
    assert len(re.findall(r"submitit WARNING .* Caught signal SIGUSR2 on \S+: this job is preempted", err_log)) == 2
    assert (run_dir / "metrics.json").is_file()
    assert torch.equal(final_table(run_dir), final_table(next((tmp_path / "reference").iterdir())))


def test_a_bad_job_fails_alone_in_one_line(cluster, tmp_path):
    """An option value only its constructor can refuse (1.5 steps) fails its own job with one line in that
    job's log; the other job finishes; the launcher names the failed job and exits 2."""
    done = sweep(cluster, tmp_path, "experiment=toy", *TINY, "trainer.max_steps=30,1.5")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 sweep jobs failed, the others finished: #1 (trainer.max_steps=1.5): "
                           "trainer.max_steps=1.5: must be a valid integer, got a number with a fractional part "
                           "(job logs: ")
    sweep_dir = next((tmp_path / "multirun").iterdir())
    assert (sweep_dir / "0" / "metrics.json").is_file()
    errors = [p for p in (sweep_dir / ".submitit").glob("*/*_log.err") if "error: " in p.read_text()]
    assert len(errors) == 1
    text = errors[0].read_text()
    assert "Traceback" not in text
    assert [line for line in text.splitlines() if line.startswith("error: ")] == [
        "error: trainer.max_steps=1.5: must be a valid integer, got a number with a fractional part"]


def test_an_unknown_option_in_a_sweep_is_refused_before_anything_is_submitted(cluster, tmp_path):
    done = sweep(cluster, tmp_path, "seed=0", "prompts=perpneg,perpnegg", "experiment=toy", *TINY)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: unknown prompts 'perpnegg': choose one of perpneg, plain, " \
                                                   "stable_dreamfusion"
    assert not (tmp_path / "multirun").exists()  # no job was submitted
