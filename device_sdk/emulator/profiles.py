"""Device speed profiles: how much later than its host allows each emulated device finishes.

Real fleets are heterogeneous: a few slow phones hold back every synchronous
round. A profile gives emulated device ``i`` a slowdown factor (a training
that took ``t`` seconds on the host completes after ``factor * t``) or a
fixed extra delay in seconds. Profiles are deterministic: a device's speed
depends only on the profile, the seed and the device index, so fleets split
across processes agree.

Named profiles: ``uniform`` (no delay) and ``heterogeneous`` (speed tiers:
50 % of the devices at 1x, 30 % at 3x, 20 % at 10x; exact shares of a fleet
of known size, dealt by a seeded permutation). A trace file
is either a device trace (``device_sdk.emulator.traces``, docs/traces.md:
speeds, bandwidths and availability windows; a ``TraceProfile``) or the
older JSON object from device index to a delay in seconds (a number) or
``{"factor": f}`` / ``{"delay_s": s}``; devices it does not list have no delay.

On a real broker the fleet sleeps out the delay before sending the update.
In an in-process run ``VirtualTime`` emulates it instead: trainings complete
in the order of their emulated durations, with no sleeping, so the run stays
deterministic and takes only the time its computation needs. Under a trace a
task's length depends on the task (its examples, epochs and model size), so
the task runs when it arrives and waits in emulated time for its update to
be due (a ``Fiber``); a device whose window closes first never answers.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from broker import TrainTask
from device_sdk.app import DeviceContext, TrainHandler, TrainResult
from device_sdk.emulator._trace_io import is_trace_document, parse_trace, read_json
from device_sdk.emulator._trace_live import WallClock
from device_sdk.emulator._trace_model import ProfileError as ProfileError
from device_sdk.emulator._trace_model import Trace
from device_sdk.emulator._trace_pacing import (
    Fiber,
    abandonable,
    current_fiber,
    trace_paced,
)

Runner = Callable[[Callable[[], None]], None]

PROFILES = ("uniform", "heterogeneous")
"""Profile names ``load_profile`` knows; anything else is read as a trace file."""

HETEROGENEOUS_TIERS: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.3, 3.0), (0.2, 10.0))
"""``(share of devices, slowdown factor)`` of the ``heterogeneous`` profile."""

_SPEED_STREAM = 0x5BEED
"""Keeps the speed draw independent of the other draws seeded by ``[seed, index]``."""

TRACE_STEP_S = 5.0
"""Under a trace, emulated time stops at least this often: a deadline that falls
between two trace events is seen at most this late."""


@dataclass(frozen=True)
class SpeedProfile:
    """Per-device slowdowns of an emulated fleet.

    Parameters
    ----------
    name
        Shown in logs and results.
    factors
        Slowdown factor (>= 1) of listed devices, by index.
    delays_s
        Fixed extra delay in seconds of listed devices, by index (wins over a factor).
    tiers
        ``(share, factor)`` pairs an unlisted device takes its factor from.
    seed
        Seeds the tier assignment.
    devices
        Fleet size: tiers get exact shares of it (rounded), dealt to a seeded
        permutation of the indices; 0 (or an index beyond it) draws each
        device's tier on its own.
    """

    name: str = "uniform"
    factors: Mapping[int, float] = field(default_factory=dict)
    delays_s: Mapping[int, float] = field(default_factory=dict)
    tiers: tuple[tuple[float, float], ...] = ()
    seed: int = 0
    devices: int = 0

    def factor(self, index: int) -> float:
        """Return device ``index``'s slowdown factor (1.0: as fast as the host)."""
        if index in self.factors:
            return self.factors[index]
        if not self.tiers:
            return 1.0
        if index < self.devices:
            rank = np.random.default_rng([self.seed, _SPEED_STREAM]).permutation(self.devices)
            position = int(np.flatnonzero(rank == index)[0])
            bounds = np.round(np.cumsum([share for share, _ in self.tiers]) * self.devices)
            tier = int(np.searchsorted(bounds, position, side="right"))
            return self.tiers[min(tier, len(self.tiers) - 1)][1]
        u = np.random.default_rng([self.seed, index, _SPEED_STREAM]).random()
        for share, factor in self.tiers:
            if u < share:
                return factor
            u -= share
        return self.tiers[-1][1]

    def delay_s(self, index: int, trained_s: float) -> float:
        """Return how long device ``index`` waits after a training that took ``trained_s``."""
        fixed = self.delays_s.get(index)
        if fixed is not None:
            return fixed
        return max(self.factor(index) - 1.0, 0.0) * trained_s

    def duration_s(self, index: int, nominal_s: float) -> float:
        """Return device ``index``'s emulated time for a training nominally ``nominal_s`` long."""
        return nominal_s + self.delay_s(index, nominal_s)

    def slowed(
        self, handler: TrainHandler, index: int, *, sleep: Callable[[float], None] = time.sleep
    ) -> TrainHandler:
        """Return ``handler`` finishing as late as device ``index``'s speed says (real time)."""

        def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
            started = time.perf_counter()
            result = handler(task, ctx)
            sleep(self.delay_s(index, time.perf_counter() - started))
            return result

        return train

    def summary(self, indices: Iterable[int]) -> dict[str, int]:
        """Return how many of the devices ``indices`` train at each factor (or fixed delay)."""
        counts: dict[str, int] = {}
        for i in indices:
            key = f"delay {self.delays_s[i]:g}s" if i in self.delays_s else f"{self.factor(i):g}x"
            counts[key] = counts.get(key, 0) + 1
        return counts


@dataclass(frozen=True, kw_only=True)
class TraceProfile(SpeedProfile):
    """Device speeds and availability from a device trace (docs/traces.md).

    Device ``i`` plays the trace's entry ``i mod len``. A task takes the
    model's download, examples x epochs x the entry's ms per example, and the
    update's upload; a device offline when the task arrives, or whose window
    closes before the upload is out, never answers. ``AvailabilityDriver``
    (``device_sdk.emulator.traces``) checks devices out and in as their
    windows close and open.

    Parameters
    ----------
    trace
        The devices' entries.
    wall_clock
        Trace time in real runs (trace second 0 is when the profile was made).
    """

    trace: Trace
    wall_clock: WallClock = field(default_factory=WallClock, compare=False, repr=False)

    def summary(self, indices: Iterable[int]) -> dict[str, int]:
        """Return how many of the devices ``indices`` are always on, sometimes, or never online."""
        counts: dict[str, int] = {}
        for i in indices:
            availability = self.trace.device(i).availability
            key = "windows" if availability.windows else "never online"
            if availability.always_on:
                key = "always on"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def slowed(
        self, handler: TrainHandler, index: int, *, sleep: Callable[[float], None] = time.sleep
    ) -> TrainHandler:
        """Return ``handler`` sleeping out device ``index``'s trace time, or abandoning the task."""
        clock = WallClock(self.wall_clock.origin, sleep=sleep)
        return trace_paced(handler, self.trace.device(index), clock, real_time=True)


def heterogeneous(seed: int = 0, devices: int = 0) -> SpeedProfile:
    """Return the ``heterogeneous`` profile: 50 % of devices at 1x, 30 % at 3x, 20 % at 10x."""
    return SpeedProfile("heterogeneous", tiers=HETEROGENEOUS_TIERS, seed=seed, devices=devices)


def from_trace(path: str | Path) -> SpeedProfile:
    """Read a trace file: a device trace (docs/traces.md), or the older delay map.

    The delay map is ``{"<index>": seconds | {"factor": f} | {"delay_s": s}, ...}``.
    """
    p = Path(path)
    raw = read_json(p, "speed trace")
    if is_trace_document(raw):
        return TraceProfile(name=f"trace:{p.name}", trace=parse_trace(raw, origin=str(p)))
    if not isinstance(raw, dict):
        raise ProfileError(f"speed trace {p}: expected an object from device index to delay")
    factors: dict[int, float] = {}
    delays: dict[int, float] = {}
    for key, value in raw.items():
        index = _index(p, key)
        if isinstance(value, dict) and set(value) == {"factor"}:
            factors[index] = _number(p, key, value["factor"], low=1.0)
        elif isinstance(value, dict) and set(value) == {"delay_s"}:
            delays[index] = _number(p, key, value["delay_s"], low=0.0)
        else:
            delays[index] = _number(p, key, value, low=0.0)
    return SpeedProfile(f"trace:{p.name}", factors=factors, delays_s=delays)


def load_profile(spec: str, *, seed: int = 0, devices: int = 0) -> SpeedProfile:
    """Return the profile a ``--profile`` value names: ``uniform``, ``heterogeneous`` or a trace.

    ``seed`` and ``devices`` (the fleet's size) fix the heterogeneous tiers.
    A trace file is sniffed: a device trace (its ``format`` field) gives a
    ``TraceProfile``, anything else is read as the older delay map.
    """
    if spec == "uniform":
        return SpeedProfile()
    if spec == "heterogeneous":
        return heterogeneous(seed, devices)
    if not Path(spec).exists():
        raise ProfileError(f"unknown speed profile {spec!r}: one of {PROFILES} or a trace file")
    return from_trace(spec)


def _index(path: Path, key: str) -> int:
    """Return a trace key as a device index, or raise ``ProfileError``."""
    if not key.isdigit():
        raise ProfileError(f"speed trace {path}: {key!r} is not a device index")
    return int(key)


def _number(path: Path, key: str, value: object, *, low: float) -> float:
    """Return a trace value as a float of at least ``low``, or raise ``ProfileError``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
        raise ProfileError(f"speed trace {path}: device {key}: expected a number >= {low:g}")
    return float(value)


class VirtualTime:
    """Emulated time for an in-process run: trainings finish in emulated-duration order.

    A device's runner queues its training at ``now + duration``; ``advance``
    moves the clock to the earliest queued completion and runs it (training
    and publishing its update). Ties keep the order the tasks arrived in.
    Pass the instance as the coordinator's clock, so round timings and
    deadlines are in emulated seconds too.

    Under a trace, tasks run as fibers (``fiber_runner``) that wait for their
    update's due time with ``sleep_until``, and ``call_at`` schedules any job
    (an availability driver's check-outs and check-ins).

    Parameters
    ----------
    nominal_s
        Emulated seconds a 1x device needs for one task.
    start
        The clock's initial reading.
    max_step_s
        If set, ``advance`` moves the clock at most this far at once, so the
        caller gets to look (for deadlines) between two distant events.
    """

    def __init__(
        self, *, nominal_s: float = 1.0, start: float = 0.0, max_step_s: float | None = None
    ) -> None:
        self.nominal_s = nominal_s
        self.now = start
        self.max_step_s = max_step_s
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._fibers: set[Fiber] = set()

    def __call__(self) -> float:
        """Return the emulated time."""
        return self.now

    def call_at(self, at: float, job: Callable[[], None]) -> None:
        """Run ``job`` when the clock reaches ``at`` (the next ``advance``, if it has)."""
        with self._lock:
            heapq.heappush(self._queue, (max(at, self.now), next(self._order), job))

    def runner(self, duration_s: float) -> Runner:
        """Return a runner that completes each job ``duration_s`` emulated seconds later."""

        def run(job: Callable[[], None]) -> None:
            self.call_at(self.now + duration_s, job)

        return run

    def fiber_runner(self) -> Runner:
        """Return a runner that starts each job now, as a fiber that may ``sleep_until``."""

        def run(job: Callable[[], None]) -> None:
            fiber = Fiber(job, self._local)
            with self._lock:
                self._fibers.add(fiber)
            self.call_at(self.now, lambda: self._step(fiber))

        return run

    def sleep_until(self, at: float) -> None:
        """Pause the calling fiber until the clock reaches ``at``."""
        fiber = current_fiber(self._local)
        if fiber is None:
            raise RuntimeError("VirtualTime.sleep_until is for jobs of its fiber_runner")
        self.call_at(at, lambda: self._step(fiber))
        fiber.pause()

    def _step(self, fiber: Fiber) -> None:
        """Run a fiber to its next pause; forget it once it ends."""
        try:
            fiber.step()
        finally:
            if fiber.done:
                with self._lock:
                    self._fibers.discard(fiber)

    @property
    def pending(self) -> int:
        """Return how many trainings are queued."""
        return len(self._queue)

    def advance(self) -> bool:
        """Run the earliest queued job at its time; False if none is queued.

        With ``max_step_s``, a job further ahead than that is left queued and
        the clock moves ``max_step_s`` on (True: time passed).
        """
        with self._lock:
            if not self._queue:
                return False
            if self.max_step_s is not None and self._queue[0][0] > self.now + self.max_step_s:
                self.now += self.max_step_s
                return True
            at, _, job = heapq.heappop(self._queue)
            self.now = max(self.now, at)
        job()
        return True

    def skip(self, seconds: float) -> None:
        """Let ``seconds`` of emulated time pass with nothing completing (deadlines may expire)."""
        self.now += seconds

    def close(self) -> None:
        """Drop queued jobs and end paused fibers (their tasks never answer)."""
        with self._lock:
            self._queue.clear()
            fibers, self._fibers = self._fibers, set()
        for fiber in fibers:
            fiber.cancel()


def paced(
    handler: TrainHandler,
    run: Runner | None,
    index: int,
    profile: SpeedProfile | None,
    virtual_time: VirtualTime | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[TrainHandler, Runner | None]:
    """Return device ``index``'s handler and runner, slowed down as ``profile`` says.

    In emulated time the runner defers the training; otherwise the handler
    sleeps out the delay after training, with ``sleep``, which may end the
    task by raising ``TaskAbandoned`` (a fleet stopping). Under a
    ``TraceProfile`` the task's length comes from the trace and the task
    itself (see ``TraceProfile``); in emulated time the clock then stops at
    least every ``TRACE_STEP_S``.
    """
    if isinstance(profile, TraceProfile):
        device = profile.trace.device(index)
        if virtual_time is not None:
            if virtual_time.max_step_s is None:
                virtual_time.max_step_s = TRACE_STEP_S
            paced_handler = trace_paced(handler, device, virtual_time, real_time=False)
            return paced_handler, virtual_time.fiber_runner()
        return profile.slowed(handler, index, sleep=sleep), abandonable(run)
    if virtual_time is not None:
        duration = (profile or SpeedProfile()).duration_s(index, virtual_time.nominal_s)
        return handler, virtual_time.runner(duration)
    if profile is not None and (profile.tiers or profile.factors or profile.delays_s):
        return profile.slowed(handler, index, sleep=sleep), abandonable(run)
    return handler, run
