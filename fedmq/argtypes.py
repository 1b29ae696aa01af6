"""Argument types the `fedmq` commands share: numbers with a floor, refused in one line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole_number(minimum: int) -> Callable[[str], int]:
    """Return an argparse type taking whole numbers of ``minimum`` or more."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value

    return parse


def seconds(minimum: float) -> Callable[[str], float]:
    """Return an argparse type taking finite seconds of ``minimum`` or more."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(f"{text} s: at least {minimum:g} s")
        return value

    return parse


positive = whole_number(1)
"""Whole numbers from 1: counts of rounds, devices, workers."""
