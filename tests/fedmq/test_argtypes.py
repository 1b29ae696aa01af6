"""fedmq.argtypes: the number types every command's flags share."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import pytest

from fedmq.argtypes import positive, seconds, whole_number


def test_numbers_at_or_above_the_floor_are_taken() -> None:
    # Execute / Assert
    assert (positive("3"), whole_number(0)("0"), seconds(1)("1"), seconds(1)("2.5")) == (
        3,
        0,
        1.0,
        2.5,
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
    ],
)
def test_anything_else_is_refused_saying_why(
    parse: Callable[[str], object], text: str, says: str
) -> None:
    # Execute / Assert
    with pytest.raises(argparse.ArgumentTypeError, match=says):
        parse(text)
