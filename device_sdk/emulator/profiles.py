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
is a JSON object from device index to a delay in seconds (a number) or
``{"factor": f}`` / ``{"delay_s": s}``; devices it does not list have no delay.

On a real broker the fleet sleeps out the delay before sending the update.
In an in-process run ``VirtualTime`` emulates it instead: trainings complete
in the order of their emulated durations, with no sleeping, so the run stays
deterministic and takes only the time its computation needs.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from broker import TrainTask
from device_sdk.app import DeviceContext, TrainHandler, TrainResult
from device_sdk.errors import DeviceError

Runner = Callable[[Callable[[], None]], None]

PROFILES = ("uniform", "heterogeneous")
"""Profile names ``load_profile`` knows; anything else is read as a trace file."""

HETEROGENEOUS_TIERS: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.3, 3.0), (0.2, 10.0))
"""``(share of devices, slowdown factor)`` of the ``heterogeneous`` profile."""

_SPEED_STREAM = 0x5BEED
"""Keeps the speed draw independent of the other draws seeded by ``[seed, index]``."""


class ProfileError(DeviceError):
    """A speed profile that cannot be used: unknown name, unreadable or malformed trace.

    Raised when a fleet is set up, never sent by a device: it keeps the root's code.
    """


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


def heterogeneous(seed: int = 0, devices: int = 0) -> SpeedProfile:
    """Return the ``heterogeneous`` profile: 50 % of devices at 1x, 30 % at 3x, 20 % at 10x."""
    return SpeedProfile("heterogeneous", tiers=HETEROGENEOUS_TIERS, seed=seed, devices=devices)


def from_trace(path: str | Path) -> SpeedProfile:
    """Read a trace file: ``{"<index>": seconds | {"factor": f} | {"delay_s": s}, ...}``."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read speed trace {p}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ProfileError(f"speed trace {p} is not valid JSON: {exc}") from exc
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

    Parameters
    ----------
    nominal_s
        Emulated seconds a 1x device needs for one task.
    start
        The clock's initial reading.
    """

    def __init__(self, *, nominal_s: float = 1.0, start: float = 0.0) -> None:
        self.nominal_s = nominal_s
        self.now = start
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """Return the emulated time."""
        return self.now

    def runner(self, duration_s: float) -> Runner:
        """Return a runner that completes each job ``duration_s`` emulated seconds later."""

        def run(job: Callable[[], None]) -> None:
            with self._lock:
                heapq.heappush(self._queue, (self.now + duration_s, next(self._order), job))

        return run

    @property
    def pending(self) -> int:
        """Return how many trainings are queued."""
        return len(self._queue)

    def advance(self) -> bool:
        """Run the earliest queued training at its completion time; False if none is queued."""
        with self._lock:
            if not self._queue:
                return False
            at, _, job = heapq.heappop(self._queue)
            self.now = max(self.now, at)
        job()
        return True

    def skip(self, seconds: float) -> None:
        """Let ``seconds`` of emulated time pass with nothing completing (deadlines may expire)."""
        self.now += seconds


def paced(
    handler: TrainHandler,
    run: Runner | None,
    index: int,
    profile: SpeedProfile | None,
    virtual_time: VirtualTime | None,
) -> tuple[TrainHandler, Runner | None]:
    """Return device ``index``'s handler and runner, slowed down as ``profile`` says.

    In emulated time the runner defers the training; otherwise the handler
    sleeps out the delay after training.
    """
    if virtual_time is not None:
        duration = (profile or SpeedProfile()).duration_s(index, virtual_time.nominal_s)
        return handler, virtual_time.runner(duration)
    if profile is not None and (profile.tiers or profile.factors or profile.delays_s):
        return profile.slowed(handler, index), run
    return handler, run
