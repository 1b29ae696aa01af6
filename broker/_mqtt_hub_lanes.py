"""Lanes: many serial job queues sharing a few worker threads.

The MQTT hub gives each client a lane. A client's deliveries and reconnect
listeners run in order, one at a time, like on the dispatcher thread each
``MqttTransport`` owns; across clients they run side by side on the pool. A
handler that blocks (a device trains, or publishes and waits for its PUBACK)
holds one worker, never the hub's network thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("broker.mqtt_hub")

Job = Callable[[], None]

CLOSE_WAIT_S = 5.0
"""How long closing a lane waits for its running job to finish."""


class Lanes:
    """A pool of ``threads`` workers running the jobs of many ``Lane`` objects."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError(f"a lane pool needs at least one thread, not {threads}")
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        self._job_done = threading.Condition(self._lock)
        self._ready: list[Lane] = []
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def lane(self) -> Lane:
        """Return a new, empty lane."""
        return Lane(self)

    def stop(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Finish the running jobs, drop the queued ones and end the workers."""
        with self._lock:
            self._stopping = True
            self._ready.clear()
            self._work_ready.notify_all()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _schedule(self, lane: Lane) -> None:
        """Queue ``lane`` for a worker (lock held)."""
        self._ready.append(lane)
        self._work_ready.notify()

    def _work(self) -> None:
        while True:
            with self._lock:
                self._work_ready.wait_for(lambda: self._ready or self._stopping)
                if self._stopping:
                    return
                lane = self._ready.pop(0)
                job = lane._take()
            if job is not None:
                _run(job)
            with self._lock:
                lane._done(self)


class Lane:
    """Jobs that run in the order submitted, one at a time, on a ``Lanes`` pool."""

    __slots__ = ("_closed", "_jobs", "_pool", "_runner")

    def __init__(self, pool: Lanes) -> None:
        self._pool = pool
        self._jobs: list[Job] = []
        self._runner: int | None = None  # the thread running one of our jobs
        self._closed = False

    def submit(self, job: Job) -> None:
        """Run ``job`` after the lane's earlier jobs; dropped once the lane is closed."""
        with self._pool._lock:
            if self._closed:
                return
            self._jobs.append(job)
            if len(self._jobs) == 1 and self._runner is None:
                self._pool._schedule(self)

    def close(self, timeout: float = CLOSE_WAIT_S) -> None:
        """Drop the queued jobs and wait, bounded, for the running one (not when called by it)."""
        me = threading.get_ident()
        with self._pool._lock:
            self._closed = True
            self._jobs.clear()
            self._pool._job_done.wait_for(lambda: self._runner in (None, me), timeout)

    def _take(self) -> Job | None:
        """Take the next job to run (pool lock held)."""
        if not self._jobs:
            return None
        self._runner = threading.get_ident()
        return self._jobs.pop(0)

    def _done(self, pool: Lanes) -> None:
        """Requeue the lane if more jobs came in while one ran (pool lock held)."""
        self._runner = None
        if self._jobs:
            pool._schedule(self)
        pool._job_done.notify_all()


def _run(job: Job) -> None:
    try:
        job()
    except Exception:  # a job's own failure must not end a shared worker
        log.exception("a job on an MQTT hub lane failed")
