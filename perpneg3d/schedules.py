"""Scalar schedules over training steps."""
from __future__ import annotations

from typing import Sequence, Union

Ramp = Union[float, int, Sequence[float]]


def ramp(value: Ramp, step: int) -> float:
    """A constant, or [start_step, start_value, end_value, end_step] linearly interpolated and held
    constant outside (threestudio's C() convention)."""
    if isinstance(value, (int, float)):
        return float(value)
    start_step, start_value, end_value, end_step = value
    frac = min(max((step - start_step) / max(end_step - start_step, 1), 0.0), 1.0)
    return float(start_value + frac * (end_value - start_value))
