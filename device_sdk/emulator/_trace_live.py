"""Playing a trace's availability: clocks in trace seconds, and a driver that takes devices offline.

The driver needs only a clock that can call back at a time (``VirtualTime``
in an in-process run, ``WallClock`` in real time) and, per device, a handle
that can check in and check out (``DeviceClient`` is one). It keeps no
thread of its own: every transition schedules the next.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from device_sdk.emulator._trace_model import Trace

log = logging.getLogger(__name__)

OFFLINE_REASON = "offline (trace)"
"""The check-out reason of a device whose availability window closed."""


class Scheduler(Protocol):
    """A clock in trace seconds that can run a job at a later reading."""

    def __call__(self) -> float:
        """Return the current time."""
        ...

    def call_at(self, at: float, job: Callable[[], None]) -> None:
        """Run ``job`` once the clock reads ``at`` (at once if it already does)."""
        ...


class DeviceHandle(Protocol):
    """What the driver does to a device: a started ``DeviceClient`` fits."""

    def rejoin(self) -> None:
        """Tell the coordinator the device is back online."""
        ...

    def stop(self, reason: str = ...) -> None:
        """Tell the coordinator the device is leaving (and stay quiet until ``rejoin``)."""
        ...


class WallClock:
    """Real time in trace seconds: ``origin`` (a ``time.monotonic`` reading) is trace second 0.

    Jobs scheduled with ``call_at`` run one after another on a single timer
    thread (started with the first job), however many devices are waiting.

    Parameters
    ----------
    origin
        When the trace starts (default: now).
    sleep
        How ``sleep_until`` waits (tests pass a fake).
    """

    def __init__(
        self, origin: float | None = None, *, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self.origin = time.monotonic() if origin is None else origin
        self._sleep = sleep
        self._jobs: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def __call__(self) -> float:
        """Return the seconds since the trace started."""
        return time.monotonic() - self.origin

    def sleep_until(self, at: float) -> None:
        """Block the calling thread until trace second ``at``."""
        self._sleep(max(at - self(), 0.0))

    def call_at(self, at: float, job: Callable[[], None]) -> None:
        """Run ``job`` on the timer thread at trace second ``at``."""
        with self._changed:
            if self._closed:
                return
            heapq.heappush(self._jobs, (at, next(self._order), job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedmq-trace", daemon=True)
                self._thread.start()
            self._changed.notify()

    def close(self) -> None:
        """Drop pending jobs and stop the timer thread."""
        with self._changed:
            self._closed = True
            self._jobs.clear()
            self._changed.notify()

    def _run(self) -> None:
        """Run each job when its time comes, until closed."""
        while True:
            with self._changed:
                while not self._closed and (not self._jobs or self._jobs[0][0] > self()):
                    wait = self._jobs[0][0] - self() if self._jobs else None
                    self._changed.wait(wait)
                if self._closed:
                    return
                _, _, job = heapq.heappop(self._jobs)
            try:
                job()
            except Exception:
                log.exception("a trace timer job failed")


class AvailabilityDriver:
    """Checks devices out when their trace window closes and in again when the next one opens.

    Parameters
    ----------
    trace
        Device ``first + j`` plays entry ``(first + j) mod len(trace)``.
    clock
        Trace seconds, and where transitions are scheduled.
    """

    def __init__(self, trace: Trace, clock: Scheduler) -> None:
        self.trace = trace
        self.clock = clock
        self.went_offline = 0
        self.came_online = 0
        self._online: dict[int, bool] = {}
        self._lock = threading.Lock()

    def attach(self, devices: Sequence[DeviceHandle], *, first: int = 0) -> None:
        """Drive ``devices`` (already started: checked in), fleet indices from ``first``.

        A device offline at the current trace time checks out at once.
        """
        now = self.clock()
        for j, handle in enumerate(devices):
            index = first + j
            availability = self.trace.device(index).availability
            with self._lock:
                self._online[index] = True
            if availability.online_at(now):
                self._schedule_offline(index, handle, now)
            else:
                self._go_offline(index, handle)

    def is_online(self, index: int) -> bool:
        """Return whether fleet device ``index`` is online (True for devices not driven)."""
        with self._lock:
            return self._online.get(index, True)

    def online_count(self) -> int:
        """Return how many driven devices are online now."""
        with self._lock:
            return sum(self._online.values())

    def _schedule_offline(self, index: int, handle: DeviceHandle, now: float) -> None:
        """Check the device out when its current window closes."""
        until = self.trace.device(index).availability.online_until(now)
        if until is not None and math.isfinite(until):
            self.clock.call_at(until, lambda: self._go_offline(index, handle))

    def _go_offline(self, index: int, handle: DeviceHandle) -> None:
        """Check the device out and schedule its return."""
        with self._lock:
            self._online[index] = False
            self.went_offline += 1
        _quietly(lambda: handle.stop(OFFLINE_REASON), index, "check-out")
        back = self.trace.device(index).availability.next_online(self.clock())
        if back is not None:
            self.clock.call_at(back, lambda: self._go_online(index, handle))

    def _go_online(self, index: int, handle: DeviceHandle) -> None:
        """Check the device in and schedule its next departure."""
        with self._lock:
            self._online[index] = True
            self.came_online += 1
        _quietly(handle.rejoin, index, "check-in")
        self._schedule_offline(index, handle, self.clock())


def _quietly(action: Callable[[], None], index: int, what: str) -> None:
    """Run a device's check-in or check-out; a broker hiccup is logged, the driver goes on."""
    try:
        action()
    except Exception:
        log.warning("trace %s of device %d failed", what, index, exc_info=True)
