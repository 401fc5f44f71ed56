"""Sweep launchers: hydra-submitit-launcher's, with failures reported per job in one line.

`hydra/launcher=submitit_slurm|submitit_local` name hydra_plugins/perpneg3d_sweeps (Hydra loads launchers
from that namespace only), which mix OneLineJobs into the plugin's classes. What it adds:
- a job whose overrides do not compose, or whose options a constructor refuses, writes one `error:` line
  to its own log and is recorded as failed; the other jobs run on, and the launcher waits for every job
  before it reports, in one line, which jobs failed, why, and where their logs are;
- on a SLURM without accounting storage (no slurmdbd: `sacct` answers "Slurm accounting storage is
  disabled" to every poll), submitit reads the job states from `squeue` instead, after one line that says so.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus
from submitit.slurm.slurm import SlurmInfoWatcher

from perpneg3d.errors import ConfigError, PerpNegError, first_line

log = logging.getLogger(__name__)


class OneLineJobs:
    """Mix-in for hydra-submitit-launcher's launchers (see the module's docstring)."""

    def __call__(self, sweep_overrides: list[str], *args: Any) -> JobReturn:
        from perpneg3d.config import quiet_schema_warning

        quiet_schema_warning()  # in the job's own process, as train.py does in the launcher's
        try:
            ret = super().__call__(sweep_overrides, *args)
        except PerpNegError as err:
            ret = JobReturn(overrides=sweep_overrides, status=JobStatus.FAILED, _return_value=err)
        except Exception as err:  # noqa: BLE001  Hydra raises several classes when a job's overrides do not compose
            from perpneg3d.config import explain_compose_error

            ret = JobReturn(overrides=sweep_overrides, status=JobStatus.FAILED,
                            _return_value=ConfigError(explain_compose_error(err)))
        if ret.status == JobStatus.FAILED:
            err = ret._return_value
            if not isinstance(err, PerpNegError):  # a bug, not a user's mistake: keep the whole traceback
                return ret
            print(f"error: {err}", file=sys.stderr, flush=True)  # the one line in this job's log
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if self._EXECUTOR == "slurm":
            use_squeue_without_accounting()
            line = early_signal_warning(self.params.get("timeout_min"), self.params.get("signal_delay_s"))
            if line:
                log.warning(line)
        results = super().launch(job_overrides, initial_job_idx)  # waits for every job
        failed = [(initial_job_idx + i, r) for i, r in enumerate(results) if r.status == JobStatus.FAILED]
        if failed:
            shared = set.intersection(*(set(o) for o in job_overrides))  # name a job by what only it sets
            reasons = "; ".join(f"#{i} ({' '.join(o for o in r.overrides or [] if o not in shared)}): "
                                f"{first_line(r._return_value)}" for i, r in failed)
            print(f"error: {len(failed)} of {len(results)} sweep jobs failed, the others finished: {reasons} "
                  f"(job logs: {self.params['submitit_folder'].replace('%j', '<job id>')})", file=sys.stderr, flush=True)
            raise SystemExit(2)  # as for any user mistake: this line, no traceback (Hydra reports other exceptions)
        return results


SIGNAL_MARGIN_S = 120  # SLURM may send --signal up to 60 s early, and a job needs time to start before it can catch it


def early_signal_warning(timeout_min, signal_delay_s) -> str | None:
    """A line when SLURM's warning signal may reach a job before it can catch it: submitit's handler is installed
    only once the job has loaded (a job signalled earlier ends FAILED, not requeued)."""
    if timeout_min is None or signal_delay_s is None:
        return None
    into = 60 * float(timeout_min) - float(signal_delay_s)
    if into >= SIGNAL_MARGIN_S:
        return None
    return (f"hydra.launcher.timeout_min={timeout_min} with signal_delay_s={signal_delay_s}: SLURM sends the requeue "
            f"signal {into:.0f} s into each job, or up to 60 s earlier, possibly while the job is still starting "
            f"(it then ends FAILED, not requeued): give each job at least signal_delay_s + {SIGNAL_MARGIN_S} s")


def accounting_disabled() -> bool:
    """True when this SLURM has no accounting storage, so `sacct` cannot answer."""
    try:
        done = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(line.split("=", 1)[-1].strip() == "accounting_storage/none"
               for line in done.stdout.splitlines() if line.startswith("AccountingStorageType"))


def use_squeue_without_accounting() -> None:
    """Give submitit's SLURM jobs a state watcher that asks squeue, when sacct cannot answer."""
    from submitit.slurm import slurm

    if isinstance(slurm.SlurmJob.watcher, SqueueInfoWatcher) or not accounting_disabled():
        return
    slurm.SlurmJob.watcher = SqueueInfoWatcher(delay_s=slurm.SlurmJob.watcher._delay_s)
    log.info("this SLURM has no accounting storage (sacct is disabled): job states are read from squeue")


class SqueueInfoWatcher(SlurmInfoWatcher):
    """submitit's SLURM state watcher, reading `squeue` (the jobs SLURM still holds, finished ones for
    MinJobAge) in the format of the `sacct` output it parses. A job squeue no longer lists is UNKNOWN to
    submitit, which then decides by the job's result file, as it does when sacct fails."""

    def _make_command(self) -> list[str] | None:
        if super()._make_command() is None:  # nothing left to watch
            return None
        return ["squeue", "--noheader", "--me", "--states=all", "--format=%i|%T|%N"]

    def read_info(self, string: bytes | str) -> dict:
        text = string.decode() if isinstance(string, bytes) else string
        return super().read_info("JobID|State|NodeList\n" + text)
