"""Validation of strategy settings: a bad value is a ``ValueError`` naming the setting."""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real


def number(
    owner: str,
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float inside the given bounds, or raise ``ValueError``."""
    # bool is an int subclass, but ``momentum = true`` in a config is a mistake.
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{owner}: {name} must be a finite number, got {value!r}")
    x = float(value)
    too_low = low is not None and (x <= low if low_open else x < low)
    too_high = high is not None and (x >= high if high_open else x > high)
    if too_low or too_high:
        left = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        right = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        interval = f"{left}, {right}"
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value!r}")
    return x


def integer(owner: str, name: str, value: object, *, low: int = 0) -> int:
    """Return ``value`` as an int of at least ``low``, or raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{owner}: {name} must be an integer, got {value!r}")
    if int(value) < low:
        raise ValueError(f"{owner}: {name} must be >= {low}, got {value!r}")
    return int(value)


def metric(owner: str, metrics: Mapping[str, float], key: str, device: str) -> float:
    """Return the finite metric ``key`` a strategy needs from an update, or raise ``ValueError``."""
    if key not in metrics:
        raise ValueError(f"{owner} needs metrics[{key!r}] in every update; {device} sent none")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{owner}: metrics[{key!r}] from {device} must be finite, got {value!r}")
    return float(value)


def positive(owner: str, name: str, value: object) -> float:
    """Return ``value`` as a finite float > 0, or raise ``ValueError``."""
    return number(owner, name, value, low=0.0, low_open=True)


def open_unit(owner: str, name: str, value: object) -> float:
    """Return ``value`` as a float in (0, 1), or raise ``ValueError``."""
    return number(owner, name, value, low=0.0, high=1.0, low_open=True, high_open=True)
