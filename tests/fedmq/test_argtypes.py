"""fedmq.argtypes: the number types every command's flags share."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from fedmq.argtypes import port, positive, seconds, seed, whole_number


def test_numbers_at_or_above_the_floor_are_taken() -> None:
    # Execute / Assert
    assert (positive("3"), whole_number(0)("0"), seconds(1)("1"), seconds(1)("2.5")) == (
        3,
        0,
        1.0,
        2.5,
    )


def test_range_ends_are_taken() -> None:
    # Execute / Assert
    assert (port("0"), port("65535"), seconds(0, 10)("10"), seed(str(2**63 - 1))) == (
        0,
        65535,
        10.0,
        2**63 - 1,
    )


@pytest.mark.parametrize(
    ("parse", "text", "says"),
    [
        (positive, "0", "must be at least 1"),
        (positive, "2.5", "'2.5' is not a whole number"),
        (whole_number(0), "-1", "must be at least 0"),
        (seconds(1), "0.5", "0.5 s: at least 1 s"),
        (seconds(1), "inf", "inf s: at least 1 s"),
        (seconds(1), "nan", "nan s: at least 1 s"),
        (seconds(1), "soon", "'soon' is not a number of seconds"),
        (seconds(0, 10), "11", "11 s: from 0 to 10 s"),
        (seconds(0, 10), "nan", "nan s: from 0 to 10 s"),
        (seconds(0, 10), "1e308", "1e308 s: from 0 to 10 s"),
        (port, "65536", "must be at most 65535"),
        (port, "-1", "must be at least 0"),
        (seed, "-1", "must be at least 0"),
        (seed, str(2**63), "must be at most"),
    ],
)
def test_anything_else_is_refused_saying_why(
    parse: Callable[[str], object], text: str, says: str
) -> None:
    # Execute / Assert
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        parse(text)
