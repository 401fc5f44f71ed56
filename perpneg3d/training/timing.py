"""Per-phase wall-clock timing of training steps (benchmarks); CUDA is synchronised at phase edges."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import torch

from perpneg3d.contracts import SamplesLatents


class PhaseTimer:
    """Accumulates seconds per named phase: `with timer.phase("render"): ...`."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - start
            self.counts[name] += 1

    def reset(self) -> None:
        self.seconds.clear()
        self.counts.clear()


NULL_TIMER = PhaseTimer(enabled=False)


class TimedDenoiser:
    """Wraps a denoiser so its encode() and eps() calls are timed as their own phases."""

    def __init__(self, denoiser, timer: PhaseTimer):
        self._denoiser, self._timer = denoiser, timer

    def __getattr__(self, name):
        return getattr(self._denoiser, name)

    def encode(self, rgb):
        with self._timer.phase("encode"):
            return self._denoiser.encode(rgb)

    def encode_sample(self, rgb, generator):
        with self._timer.phase("encode"):
            den = self._denoiser
            return den.encode_sample(rgb, generator) if isinstance(den, SamplesLatents) else den.encode(rgb)

    def eps(self, latents_t, t, text_emb):
        with self._timer.phase("denoiser"):
            return self._denoiser.eps(latents_t, t, text_emb)
