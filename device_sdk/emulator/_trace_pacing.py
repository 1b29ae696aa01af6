"""Pacing a device by its trace: a task takes the trace's time, and is dropped if the device leaves.

In emulated time a task runs as a ``Fiber``: on a thread of its own, but
only while the clock's driver waits for it, so it can pause until the
emulated time its update is due (``VirtualTime.sleep_until``) without
making the run depend on thread scheduling. In real time the handler sleeps.

A device that goes offline mid-task never answers: the handler raises
``TaskAbandoned``, which ``DeviceClient.serve`` lets through (it answers
every ``Exception`` with an error reply) and the pacing runner swallows.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np

from broker import TrainTask
from device_sdk.app import DeviceContext, TrainHandler, TrainResult
from device_sdk.emulator._trace_model import DeviceTrace, TaskTiming

log = logging.getLogger(__name__)

Runner = Callable[[Callable[[], None]], None]


class TaskAbandoned(BaseException):
    """The device went offline mid-task: the task ends without a reply.

    A ``BaseException`` so that the device's catch-all error reply does not see it.
    """


class TraceClock(Protocol):
    """A clock in trace seconds a task can wait on."""

    def __call__(self) -> float:
        """Return the current time."""
        ...

    def sleep_until(self, at: float) -> None:
        """Return once the clock reads ``at``."""
        ...


class Fiber:
    """A job on a thread of its own that runs only between ``step`` and its next pause.

    Exactly one of the thread calling ``step`` and the fiber runs at a time,
    so jobs run as fibers are as deterministic as the same jobs run inline.

    Parameters
    ----------
    job
        What the fiber runs.
    local
        Thread-local storage where the fiber registers itself (``current``).
    """

    def __init__(self, job: Callable[[], None], local: threading.local) -> None:
        self._job = job
        self._local = local
        self._resume = threading.Semaphore(0)
        self._paused = threading.Semaphore(0)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.cancelled = False
        self.done = False

    @property
    def started(self) -> bool:
        """Return whether the fiber's thread runs (or ran)."""
        return self._thread is not None

    def step(self) -> None:
        """Run the fiber until it pauses or ends; re-raise what its job raised."""
        if self.done:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="fedmq-emulated", daemon=True)
            self._thread.start()
        else:
            self._resume.release()
        self._paused.acquire()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def pause(self) -> None:
        """Give control back to ``step``'s caller until the next ``step`` (called by the fiber)."""
        self._paused.release()
        self._resume.acquire()
        if self.cancelled:
            raise TaskAbandoned("the emulated run ended")

    def cancel(self) -> None:
        """End a paused fiber: its job sees ``TaskAbandoned`` where it paused."""
        self.cancelled = True
        if self.started:
            self.step()

    def _main(self) -> None:
        self._local.fiber = self
        try:
            self._job()
        except TaskAbandoned:
            pass
        except BaseException as exc:  # handed to step's caller, as an inline job would raise
            self._error = exc
        finally:
            self.done = True
            self._paused.release()


def current_fiber(local: threading.local) -> Fiber | None:
    """Return the fiber the calling thread runs, if any."""
    fiber: Fiber | None = getattr(local, "fiber", None)
    return fiber


def task_timing(
    device: DeviceTrace, task: TrainTask, result: TrainResult, start_s: float
) -> TaskTiming:
    """Return the trace's timing of a trained task: the model down, the work, the update up."""
    epochs = task.training.get("epochs", 1)
    work = result.num_examples * (epochs if isinstance(epochs, int) and epochs > 0 else 1)
    upload = sum(int(np.asarray(w).nbytes) for w in result.weights.values())
    return device.task_timing(
        work, download_bytes=task.model.size, upload_bytes=upload, start_s=start_s
    )


def trace_paced(
    handler: TrainHandler,
    device: DeviceTrace,
    clock: TraceClock,
    *,
    real_time: bool,
) -> TrainHandler:
    """Return ``handler`` finishing when ``device``'s trace says, or abandoning the task.

    The task starts when the handler is called; a device offline then
    abandons it at once. In real time a device whose window closes mid-task
    holds the task until the window closes, then abandons it.
    """

    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        start = clock()
        if not device.availability.online_at(start):
            raise TaskAbandoned(f"{ctx.device_id} is offline at trace second {start:.0f}")
        result = handler(task, ctx)
        timing = task_timing(device, task, result, start)
        if timing.finish_s is None:
            if real_time and timing.offline_s is not None:
                clock.sleep_until(timing.offline_s)
            log.debug("%s went offline mid-task at %s", ctx.device_id, timing.offline_s)
            raise TaskAbandoned(f"{ctx.device_id} went offline at {timing.offline_s}")
        clock.sleep_until(timing.finish_s)
        return result

    return train


def abandonable(run: Runner | None) -> Runner:
    """Return ``run`` (default: inline) with jobs that may end in ``TaskAbandoned``."""
    inner: Runner = run or (lambda job: job())

    def submit(job: Callable[[], None]) -> None:
        def quietly() -> None:
            with contextlib.suppress(TaskAbandoned):
                job()

        inner(quietly)

    return submit
