"""Argument types the `fedmq` commands share: numbers in a range, refused in one line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

DAY_S = 86_400.0
"""The longest wait a flag takes: longer ones are typos, and past about 1e8 s a timer overflows."""


class UsageError(Exception):
    """Bad input found after the flags parsed (an output path, a host): one line, exit 2."""


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """Return an argparse type taking whole numbers of ``minimum`` or more (to ``maximum``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}")
        return value

    return parse


def seconds(minimum: float, maximum: float | None = None) -> Callable[[str], float]:
    """Return an argparse type taking finite seconds of ``minimum`` or more (to ``maximum``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        # Written so that nan fails every comparison and is refused with the rest.
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(_range(text, minimum, maximum))
        if maximum is not None and not value <= maximum:
            raise argparse.ArgumentTypeError(_range(text, minimum, maximum))
        return value

    return parse


def _range(text: str, minimum: float, maximum: float | None) -> str:
    if maximum is None:
        return f"{text} s: at least {minimum:g} s"
    return f"{text} s: from {minimum:g} to {maximum:g} s"


positive = whole_number(1)
"""Whole numbers from 1: counts of rounds, devices, workers."""

port = whole_number(0, 65535)
"""A TCP port; 0 lets the system pick a free one."""

seed = whole_number(0, 2**63 - 1)
"""A random seed: what a config's ``seed`` takes (a device runtime's int64)."""
