"""Jobs due later on one thread: the device's "come back later", shared by a whole fleet.

A real device has one; an emulated fleet of thousands shares one, instead of
a timer thread per device and per message.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Job = Callable[[], None]


class Scheduler:
    """Runs each job after its delay, in due order, on one thread started by the first job.

    Parameters
    ----------
    name
        The thread's name.
    """

    def __init__(self, name: str = "fedmq-scheduler") -> None:
        self._name = name
        self._lock = threading.Condition()
        self._due: list[tuple[float, int, Job]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def call_later(self, delay_s: float, job: Job) -> None:
        """Run ``job`` in ``delay_s`` seconds (at once when not positive); ignored once closed."""
        with self._lock:
            if self._closed:
                return
            at = time.monotonic() + max(delay_s, 0.0)
            heapq.heappush(self._due, (at, next(self._order), job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._lock.notify()

    @property
    def pending(self) -> int:
        """Return how many jobs wait for their time."""
        with self._lock:
            return len(self._due)

    def close(self, timeout: float = 5.0) -> None:
        """Drop the jobs not yet due and stop the thread (after the job it runs)."""
        with self._lock:
            self._closed = True
            self._due.clear()
            self._lock.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                job()
            except Exception:  # one failing job must not end everyone's timers
                log.exception("a scheduled job failed")

    def _next(self) -> Job | None:
        """Wait for the next due job; None once closed."""
        with self._lock:
            while not self._closed:
                wait = self._due[0][0] - time.monotonic() if self._due else None
                if wait is not None and wait <= 0:
                    return heapq.heappop(self._due)[2]
                self._lock.wait(wait)
        return None
