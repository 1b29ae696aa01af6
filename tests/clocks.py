"""A clock the test moves by hand, for coordinators whose timing a test drives."""

from __future__ import annotations

import time


class Clock:
    """Reads ``now``, which the test moves on.

    It starts at the real time unless told otherwise: devices sign check-ins
    with theirs, and a coordinator refuses a check-in signed far from its own
    clock.
    """

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now
