"""The one retry policy both network transports share: capped exponential back-off with jitter."""

from __future__ import annotations

import random

# A generator of its own: jitter drawn from the global `random` would shift the stream
# of a researcher who seeded it, at moments set by network faults.
_JITTER = random.Random()

MAX_ATTEMPTS = 10
"""Reconnect attempts before a transport gives up and raises ``ConnectionLost``."""


def backoff(attempt: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Return seconds to wait before retry number ``attempt`` (0 for the first retry).

    Parameters
    ----------
    attempt
        How many retries came before this one; negative values count as 0.
    base
        The delay ceiling of the first retry, in seconds.
    cap
        The largest delay ever returned, in seconds.

    Returns
    -------
    float
        A delay drawn uniformly from ``[ceiling / 2, ceiling]``, where the ceiling
        is ``min(cap, base * 2**attempt)``.
    """
    # Jitter spreads out the reconnect storm of many clients cut off at once; the
    # half-ceiling floor keeps a retry from firing immediately after a failure.
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), 32))
    return _JITTER.uniform(ceiling / 2, ceiling)
