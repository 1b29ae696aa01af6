"""Driving an in-process run to its end: counting rounds, draining the buses, emulated time.

``fedmq.compose`` wires a run; this module waits for it. On ``memory://``
nothing moves unless the buses are drained, so every wait drains them first,
which keeps a run deterministic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from aggregator_service import ExperimentConfig, RoundService
from aggregator_service.persistence import RoundRecord
from broker import MemoryTransport
from device_sdk.emulator.profiles import VirtualTime

Progress = Callable[[RoundRecord], None]


class RoundCounter:
    """Round listener that reports progress and signals when the last round ended."""

    def __init__(
        self,
        count: int,
        progress: Progress | None,
        stop_when: Callable[[RoundRecord], bool] | None = None,
    ) -> None:
        self.count = count
        self.ended = 0
        self.done = threading.Event()
        self.on_stop: Callable[[], None] = lambda: None
        self._progress = progress
        self._stop_when = stop_when

    def __call__(self, record: RoundRecord) -> None:
        """Count a round that ended; report it; stop when the last (or the wanted) one did."""
        if self._progress is not None:
            self._progress(record)
        self.ended += 1
        if self._stop_when is not None and self._stop_when(record):
            self.on_stop()
            self.count = self.ended
        if self.ended >= self.count:
            self.done.set()


def drain(buses: list[MemoryTransport], timeout_s: float | None) -> None:
    """Wait until every in-process bus is idle (bridges hand messages from one to another)."""
    while True:
        before = sum(bus.delivered for bus in buses)
        for bus in buses:
            bus.join(timeout_s)
        failed = sum(len(bus.dead_letters) for bus in buses)
        if failed:
            raise RuntimeError(f"{failed} message(s) failed; see the log")
        if sum(bus.delivered for bus in buses) == before:
            return


def wait_for_devices(
    service: RoundService, expected: int, buses: list[MemoryTransport], timeout_s: float | None
) -> None:
    """Wait until every device's check-in has reached the coordinator."""
    if buses:
        drain(buses, timeout_s)
        return
    deadline = time.monotonic() + (timeout_s or 60.0)
    while len(service.devices()) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(service.devices())} of {expected} devices checked in")
        time.sleep(0.05)


def wait_for_rounds(
    ended: RoundCounter, buses: list[MemoryTransport], timeout_s: float | None
) -> None:
    """Wait until the requested rounds have ended."""
    drain(buses, timeout_s)
    if not ended.done.wait(timeout_s):
        raise TimeoutError(f"{ended.ended} of {ended.count} rounds ended in {timeout_s} s")


EMULATED_TICK_S = 1.0
"""In emulated time the coordinator looks at least this often (a trace: ``TRACE_STEP_S``).

A training that completes past a round's deadline must find the round closed,
so the clock may not leap from before a deadline to a far completion without
a tick between. A deployment's coordinator sees a deadline about this late too
(its ticks, and its close reaching the workers).
"""


def run_emulated(
    clock: VirtualTime,
    ended: RoundCounter,
    buses: list[MemoryTransport],
    tick: Callable[[], None],
    config: ExperimentConfig,
    timeout_s: float | None,
) -> None:
    """Drive an in-process run in emulated time until the requested rounds have ended.

    Between two training completions the bus drains and the coordinator
    ticks, so every step happens in one order: the run stays deterministic.
    """
    limit = time.monotonic() + (timeout_s or float("inf"))
    idle_since = clock.now

    def settled() -> bool:
        drain(buses, timeout_s)
        return ended.done.is_set()

    while not settled():
        tick()  # deadlines, expired tasks and repeats, seen with the bus idle
        if settled():
            return
        if clock.advance():
            idle_since = clock.now
        elif clock.now - idle_since > 2 * config.rounds.deadline_s + 2 * RoundService.REPEAT_S:
            raise RuntimeError(f"{ended.ended} of {ended.count} rounds ended; nothing left to run")
        else:
            clock.skip(RoundService.REPEAT_S)  # only a deadline can move the run on
        if time.monotonic() > limit:
            raise TimeoutError(f"{ended.ended} of {ended.count} rounds ended in {timeout_s} s")
