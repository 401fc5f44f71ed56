"""Graceful stop on Ctrl-C (SIGINT) and SIGTERM / SIGUSR1 / SIGUSR2 (SLURM's warning and kill signals).

The handler only sets a flag; the training loop checkpoints at the next step boundary and then hands
the signal to the handler that was installed before ours (submitit's requeue logic under
hydra-submitit-launcher), or stops cleanly when there is none. A second Ctrl-C does not wait: it
raises KeyboardInterrupt at once (the last checkpoint on disk stays valid: writes are atomic).
"""
from __future__ import annotations

import logging
import signal
import subprocess
import threading

log = logging.getLogger(__name__)
STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2"))
                     if s is not None)


class Preempted(Exception):
    """Raised after the checkpoint is written, to unwind the training loop; .signum is the signal."""

    def __init__(self, run_dir: str, signum: int | None = None):
        super().__init__(run_dir)
        self.signum = signum


class PreemptionHandler:
    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            log.warning("second Ctrl-C: stopping now, without a new checkpoint (the last one is kept)")
            raise KeyboardInterrupt
        if self.signum is None:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            log.warning("%s: checkpointing at the end of this step%s", name,
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self.signum = signum
        self._frame = frame

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def hand_over(self) -> None:
        """After checkpointing: call the previously installed handler (e.g. submitit requeue), if any."""
        previous = self._previous.get(self.signum)
        self.__exit__()
        if callable(previous) and self.signum != signal.SIGINT:  # Ctrl-C ends here: train.py prints how to resume
            try:
                previous(self.signum, getattr(self, "_frame", None))
            except subprocess.CalledProcessError as err:
                if not killed_by_its_own_requeue(err):
                    raise
                # SLURM accepted the requeue and stops the job's processes with SIGTERM: on a busy controller
                # that can reach `scontrol requeue` itself before it exits (submitit #1708's log shows the
                # order). The job is requeued; end as submitit does after a requeue it saw succeed.
                log.warning("`%s` was stopped by SIGTERM, which SLURM sends to the job it requeues: exiting "
                            "for the requeued job to resume from the checkpoint", " ".join(map(str, err.cmd)))
                raise SystemExit(-1) from None


def killed_by_its_own_requeue(err: subprocess.CalledProcessError) -> bool:
    """`scontrol requeue <job>` (submitit's requeue on SLURM) ended by SIGTERM rather than exiting."""
    cmd = [str(c) for c in err.cmd] if isinstance(err.cmd, (list, tuple)) else str(err.cmd).split()
    return cmd[:2] == ["scontrol", "requeue"] and err.returncode == -signal.SIGTERM
