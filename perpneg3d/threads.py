"""CPU threads per training job, so that jobs sharing a machine do not oversubscribe its cores.

torch uses every core by default. Two local sweep jobs (hydra/launcher=submitit_local) on a 2-core
machine then run 4 threads on 2 cores, and each step takes several times longer than alone
(README, "Sweeps"; measured in docs/benchmarks.md). threads=auto gives each job its share:

- under SLURM, the cores the job was given (SLURM_CPUS_PER_TASK);
- in a local submitit job, hydra.launcher.cpus_per_task when set, else the machine's cores divided
  by the number of jobs the sweep launched at once (counted by train.py before launching);
- otherwise torch's default (all cores).
"""
from __future__ import annotations

import logging
import math
import os

from perpneg3d.errors import ConfigError

log = logging.getLogger(__name__)
SWEEP_JOBS_ENV = "PERPNEG3D_SWEEP_JOBS"


def count_sweep_jobs(overrides: list[str]) -> int:
    """How many jobs a -m command line launches: the product of its sweeps' lengths."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    return math.prod(len(list(p.sweep_string_iterator())) for p in parsed if p.is_sweep_override()
                     and not p.is_hydra_override())


def job_threads(threads, environ=None, launcher_cpus: int | None = None, cores: int | None = None) -> int | None:
    """The thread count for this job (None: leave torch's default)."""
    environ = os.environ if environ is None else environ
    cores = cores or os.cpu_count() or 1
    if threads != "auto":
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads={threads!r}: use auto or a positive integer")
        return threads
    if environ.get("SLURM_CPUS_PER_TASK"):
        return int(environ["SLURM_CPUS_PER_TASK"])
    if "SUBMITIT_LOCAL_JOB_ID" in environ:
        if launcher_cpus:
            return int(launcher_cpus)
        jobs = max(1, int(environ.get(SWEEP_JOBS_ENV, "1")))
        return max(1, cores // min(jobs, cores))
    return None


def launcher_cpus_per_task() -> int | None:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().launcher.get("cpus_per_task")


def apply_threads(threads) -> None:
    import torch

    n = job_threads(threads, launcher_cpus=launcher_cpus_per_task())
    if n is not None:
        torch.set_num_threads(n)
        log.info("torch threads: %d", n)
