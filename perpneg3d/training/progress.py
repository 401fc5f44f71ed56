"""Training progress for people: a tqdm bar on a terminal, plain lines in a log file.

A redirected stderr (`make demo > log 2>&1`, every SLURM job's output file) would receive every
redraw of a progress bar; there, one line every `interval_s` seconds (and at the last step) says the
same: step, share done, speed, latest loss, time left.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm


class Progress:
    """progress.advance(done, loss) after each step; close() at the end (or on a stop)."""

    def __init__(self, start: int, total: int, enabled: bool = True, interval_s: float = 5.0,
                 stream: TextIO | None = None, desc: str = "train"):
        self.stream = stream if stream is not None else sys.stderr
        self.start, self.total, self.interval_s, self.desc = start, total, interval_s, desc
        self.enabled = enabled
        self.bar = None
        if enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=start, desc=desc, file=self.stream)
        self.t0 = self.last_print = time.perf_counter()
        self.loss: float | None = None

    def advance(self, done: int, loss: float | None = None, step_ms: float | None = None) -> None:
        if loss is not None:
            self.loss = loss
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4g}", ms=f"{step_ms or 0:.0f}")
            return
        now = time.perf_counter()
        if self.enabled and (now - self.last_print >= self.interval_s or done == self.total):
            self.last_print = now
            self.stream.write(self.line(done, now) + "\n")
            self.stream.flush()

    def line(self, done: int, now: float) -> str:
        per_step = (now - self.t0) / max(done - self.start, 1)
        loss = f" | loss {self.loss:.4g}" if self.loss is not None else ""
        left = per_step * (self.total - done)
        return (f"{self.desc}: step {done}/{self.total} ({100 * done / max(self.total, 1):.0f}%) | "
                f"{1000 * per_step:.0f} ms/step{loss} | {left:.0f} s left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
