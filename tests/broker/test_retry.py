"""Tests for broker.retry: the reconnect back-off both network transports share."""

from __future__ import annotations

import random

import pytest

from broker.retry import backoff


@pytest.mark.parametrize(
    ("attempt", "low", "high"), [(-3, 0.25, 0.5), (0, 0.25, 0.5), (3, 2.0, 4.0), (40, 15.0, 30.0)]
)
def test_backoff_stays_between_half_the_ceiling_and_the_ceiling(
    attempt: int, low: float, high: float
) -> None:
    # Execute
    delays = [backoff(attempt) for _ in range(200)]

    # Assert
    assert all(low <= d <= high for d in delays)
    assert len(set(delays)) > 1  # jittered, not a fixed delay


def test_backoff_draws_nothing_from_the_global_random_stream() -> None:
    # Prepare
    random.seed(7)
    expected = random.random()
    random.seed(7)

    # Execute
    for attempt in range(5):
        backoff(attempt)
    actual = random.random()

    # Assert
    assert actual == expected
