"""Types and ranges of every numeric option, checked when a component is built (pydantic).

A constructor decorated with @validated("trainer") has its annotated arguments checked by
pydantic.validate_call; a bad value becomes one ConfigError line that names the key, the value and
the rule, e.g. "trainer.max_steps=1.5: must be a valid integer, got a number with a fractional part".
The annotations below are the rules; a config key is a constructor argument, so they cover the
configs too.
"""
from __future__ import annotations

import functools
import inspect
from typing import Annotated, Sequence

from pydantic import AfterValidator, ConfigDict, Field, PlainValidator, ValidationError, validate_call

from perpneg3d.errors import ConfigError

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Degrees = Annotated[float, Field(ge=-360, le=360)]
Elevation = Annotated[float, Field(ge=-90, le=90)]
Fov = Annotated[float, Field(gt=0, lt=180)]
Unit = Annotated[float, Field(ge=0, le=1)]
WeightCurve = tuple[float, float, float]  # (A, B, C) of a view-weight curve, docs/method.md


def _ordered(pair: Sequence[float]) -> Sequence[float]:
    if pair[0] > pair[1]:
        raise ValueError(f"the first value must not exceed the second (use [{pair[1]}, {pair[0]}])")
    return pair


def _increasing(values: Sequence[float]) -> Sequence[float]:
    if any(a > b for a, b in zip(values, values[1:])):
        raise ValueError("the values must not decrease")
    return values


def _ramp(value):
    """A number, or [start_step, start_value, end_value, end_step] with start_step <= end_step
    (schedules.ramp); returned as a float or a tuple of four floats."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError("use a number or [start_step, start_value, end_value, end_step]")
    if not 0 <= value[0] <= value[3]:
        raise ValueError("the ramp's steps must satisfy 0 <= start_step <= end_step")
    return tuple(float(v) for v in value)


def _positive_ramp(value):
    """A ramp (above) whose values are all positive (an elementwise clip bound, for one)."""
    value = _ramp(value)
    if min(value[1:3] if isinstance(value, tuple) else (value,)) <= 0:
        raise ValueError("must be positive (every value of a ramp)")
    return value


RampValue = Annotated[object, PlainValidator(_ramp)]
PositiveRampValue = Annotated[object, PlainValidator(_positive_ramp)]
OpenProbability = Annotated[float, Field(ge=0, lt=1)]  # Adam's betas: 1 would divide by zero
UnitRange = Annotated[tuple[Unit, Unit], AfterValidator(_ordered)]
PositiveRange = Annotated[tuple[PositiveFloat, PositiveFloat], AfterValidator(_ordered)]
NonNegativeRange = Annotated[tuple[NonNegativeFloat, NonNegativeFloat], AfterValidator(_ordered)]
ElevationRange = Annotated[tuple[Elevation, Elevation], AfterValidator(_ordered)]
AzimuthRange = Annotated[tuple[Degrees, Degrees], AfterValidator(_ordered)]
FovRange = Annotated[tuple[Fov, Fov], AfterValidator(_ordered)]
Milestones = Annotated[Sequence[NonNegativeInt], AfterValidator(_increasing)]


def message(prefix: str, err: ValidationError, init) -> str:
    """The first error of a ValidationError as one line: key=value: rule."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join([prefix] + loc[:1]) if prefix else ".".join(loc[:1])
    if first["type"] == "unexpected_keyword_argument":
        valid = ", ".join(p for p in inspect.signature(init).parameters if p != "self")
        target = f"{init.__module__}.{init.__qualname__.rsplit('.', 1)[0]}"
        return f"config key {key} is not an argument of {target}: remove it or use one of {valid}"
    where = f"[{','.join(loc[1:])}]" if len(loc) > 1 else ""
    if first["type"] in ("missing", "too_short", "too_long"):  # a pair or list of the wrong length
        return f"{key}={first['input']!r}: wrong number of values"
    rule = first["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    return f"{key}{where}={first['input']!r}: {rule}"


def validated(prefix: str):
    """Decorator for a component's __init__: check annotated arguments, fail with one ConfigError line."""
    def decorate(init):
        checked = validate_call(config=ConfigDict(arbitrary_types_allowed=True))(init)

        @functools.wraps(init)
        def __init__(self, *args, **kwargs):
            try:
                return checked(self, *args, **kwargs)
            except ValidationError as err:
                if err.title != init.__qualname__:  # raised inside the body, not by the arguments
                    raise
                raise ConfigError(message(prefix, err, init)) from None

        return __init__

    return decorate
