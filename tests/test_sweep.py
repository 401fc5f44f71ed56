"""Sweeps through Hydra's submitit launcher, collected into one table; a requeued job resumes."""
import csv
import os
import subprocess
import sys
from pathlib import Path

from helpers import TINY_TOY, subprocess_env
from perpneg3d.threads import SWEEP_JOBS_ENV, count_sweep_jobs, job_threads

ROOT = Path(__file__).resolve().parents[1]
FAST = TINY_TOY + ["trainer.max_steps=4", "trainer.val_every=4", "trainer.ckpt_every=4", "~export"]


def run(args, timeout=600):
    env = subprocess_env()
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_submitit_local_sweep_and_collect(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run(["train.py", "-m", "seed=0,1", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}",
                "hydra.launcher.timeout_min=10", *FAST])
    assert proc.returncode == 0, proc.stderr[-2000:]
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert [j.name for j in jobs] == ["0", "1"]  # one run folder per job
    # the two jobs run at once and share the cores: each gets half of them
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    share = max(1, (os.cpu_count() or 1) // 2)
    assert logs.count(f"torch threads: {share}") == 2, logs[-2000:]
    collected = run(["scripts/collect_sweep.py", str(sweep)])
    assert collected.returncode == 0, collected.stderr
    rows = list(csv.DictReader(open(sweep / "sweep.csv")))
    assert [r["seed"] for r in rows] == ["0", "1"] and all(r["status"] == "done" for r in rows)
    assert all(0 <= float(r["front_share"]) <= 1 for r in rows)
    lines = (sweep / "sweep.md").read_text().splitlines()
    assert len(lines) == 4 and "front_share" in lines[0]  # header, rule, one row per job


def test_requeued_sweep_job_resumes_from_its_checkpoint(tmp_path):
    sweep = tmp_path / "sweep"
    first = run(["train.py", "-m", "seed=0", f"hydra.sweep.dir={sweep}", *FAST, "trainer.max_steps=3", "trainer.ckpt_every=3"])
    assert first.returncode == 0, first.stderr[-2000:]
    # the same job launched again (as submitit does after preemption) continues from step 3
    again = run(["train.py", "-m", "seed=0", f"hydra.sweep.dir={sweep}", *FAST, "trainer.max_steps=5", "trainer.ckpt_every=3"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "requeued job: resuming from" in again.stdout + again.stderr
    assert sorted(p.name for p in (sweep / "0" / "ckpts").iterdir()) == ["step_0000003.ckpt", "step_0000005.ckpt"]


def test_sweep_job_count_and_thread_share():
    assert count_sweep_jobs(["-m", "seed=0,1,2", "prompts.perp_neg=true,false", "experiment=toy"]) == 6
    assert count_sweep_jobs(["-m", "seed=range(4)", "hydra/launcher=submitit_local"]) == 4
    local = {"SUBMITIT_LOCAL_JOB_ID": "1", SWEEP_JOBS_ENV: "2"}
    assert job_threads("auto", local, cores=2) == 1
    assert job_threads("auto", local, cores=16) == 8
    assert job_threads("auto", {"SUBMITIT_LOCAL_JOB_ID": "1", SWEEP_JOBS_ENV: "6"}, cores=4) == 1  # never 0
    assert job_threads("auto", local, launcher_cpus=3, cores=16) == 3  # hydra.launcher.cpus_per_task wins
    assert job_threads("auto", {"SLURM_CPUS_PER_TASK": "8", SWEEP_JOBS_ENV: "2"}, cores=64) == 8
    assert job_threads("auto", {}, cores=16) is None  # a single run: torch's default
    assert job_threads(5, local, cores=2) == 5


def test_collect_sweep_rejects_a_wrong_folder(tmp_path):
    proc = run(["scripts/collect_sweep.py", str(tmp_path / "missing")])
    assert proc.returncode == 2 and "is not a folder" in proc.stderr


def test_a_signal_that_may_come_before_the_job_can_catch_it_is_warned_of():
    """timeout_min=1 with signal_delay_s=45 signals 15 s into a job, or earlier (SLURM may be 60 s early): the
    job may still be loading, and a job signalled then ends FAILED. 120 s of margin or more: no line."""
    from perpneg3d.sweeps import early_signal_warning

    assert early_signal_warning(1, 45) == (
        "hydra.launcher.timeout_min=1 with signal_delay_s=45: SLURM sends the requeue signal 15 s into each job, or "
        "up to 60 s earlier, possibly while the job is still starting (it then ends FAILED, not requeued): give each "
        "job at least signal_delay_s + 120 s")
    assert early_signal_warning(60, 120) is None and early_signal_warning(4, 120) is None
    assert early_signal_warning(3.9, 120) is not None and early_signal_warning(None, 120) is None
