"""Device traces in memory: speeds, bandwidths, availability windows, and the time a task takes.

A trace is periodic: its windows lie in ``[0, period_s]`` and repeat every
``period_s`` seconds, so a window that ends at ``period_s`` and one that starts
at 0 form one spell across the wrap. Times are seconds from the trace's start.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field

from device_sdk.errors import DeviceError

Window = tuple[float, float]
"""``(start_s, end_s)``: half-open, ``start_s < end_s``."""

BITS_PER_MBIT = 1_000_000.0


class ProfileError(DeviceError):
    """A speed profile that cannot be used: unknown name, unreadable or malformed trace.

    Raised when a fleet is set up, never sent by a device: it keeps the root's code.
    """


class TraceError(ProfileError):
    """A device trace that cannot be used; the message names the file, the device and the field."""


@dataclass(frozen=True)
class Availability:
    """When a device is online (and charging), repeating every ``period_s`` seconds.

    Parameters
    ----------
    windows
        Online windows, sorted, disjoint and not touching, within ``[0, period_s]``.
    period_s
        The trace's period: window times repeat after it.
    charging
        Charging windows, same rules (informational: selection policies may use them).
    """

    windows: tuple[Window, ...]
    period_s: float
    charging: tuple[Window, ...] = ()
    _starts: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", tuple(start for start, _ in self.windows))

    @classmethod
    def always(cls, period_s: float) -> Availability:
        """Return a device online all the time."""
        return cls(((0.0, period_s),), period_s)

    @property
    def always_on(self) -> bool:
        """Return whether the device is never offline."""
        return self.windows == ((0.0, self.period_s),)

    def online_at(self, t: float) -> bool:
        """Return whether the device is online at ``t``."""
        return self._window_at(t) is not None

    def charging_at(self, t: float) -> bool:
        """Return whether the device is charging at ``t``."""
        u = t - math.floor(t / self.period_s) * self.period_s
        return any(start <= u < end for start, end in self.charging)

    def online_until(self, t: float) -> float | None:
        """Return when the online spell holding ``t`` ends (inf: never; None: offline at ``t``)."""
        found = self._window_at(t)
        if found is None:
            return None
        if self.always_on:
            return math.inf
        base, (_, end) = found
        if end == self.period_s and self.windows[0][0] == 0.0:
            return base + self.period_s + self.windows[0][1]  # runs on across the wrap
        return base + end

    def next_online(self, t: float) -> float | None:
        """Return the earliest time at or after ``t`` the device is online (None: never)."""
        if not self.windows:
            return None
        if self.online_at(t):
            return t
        base = math.floor(t / self.period_s) * self.period_s
        i = bisect_right(self._starts, t - base)
        if i < len(self.windows):
            return base + self.windows[i][0]
        return base + self.period_s + self.windows[0][0]

    def online_fraction(self) -> float:
        """Return the share of the period the device is online."""
        return sum(end - start for start, end in self.windows) / self.period_s

    def _window_at(self, t: float) -> tuple[float, Window] | None:
        """Return ``(period base, window)`` of the window holding ``t``, or None."""
        base = math.floor(t / self.period_s) * self.period_s
        u = t - base
        i = bisect_right(self._starts, u) - 1
        if i >= 0 and u < self.windows[i][1]:
            return base, self.windows[i]
        return None


@dataclass(frozen=True)
class TaskTiming:
    """How a task went on a device: when it finished, or when the device went offline.

    Parameters
    ----------
    start_s
        When the task reached the device.
    download_s, compute_s, upload_s
        How long each phase takes at the device's speeds.
    finish_s
        When the update is out (None: the device went offline first).
    offline_s
        When the device went offline mid-task (``start_s`` if it was offline
        already); None if the task finished.
    next_online_s
        When the device is online again after ``offline_s`` (None: finished, or never again).
    """

    start_s: float
    download_s: float
    compute_s: float
    upload_s: float
    finish_s: float | None
    offline_s: float | None = None
    next_online_s: float | None = None

    @property
    def completed(self) -> bool:
        """Return whether the device sent its update."""
        return self.finish_s is not None

    @property
    def busy_s(self) -> float:
        """Return the task's length on this device if nothing interrupts it."""
        return self.download_s + self.compute_s + self.upload_s


@dataclass(frozen=True)
class DeviceTrace:
    """One device's speeds and availability.

    Parameters
    ----------
    id
        The trace's name for the device (a fleet's device ids are its own).
    compute_ms_per_example
        Milliseconds of local training per example and epoch.
    down_mbps, up_mbps
        Download and upload bandwidth in Mbit/s (1 Mbit = 10^6 bits).
    availability
        When the device is online and charging.
    model
        The device's hardware model, where the trace knows it.
    """

    id: str
    compute_ms_per_example: float
    down_mbps: float
    up_mbps: float
    availability: Availability
    model: str | None = None

    def task_timing(
        self,
        examples: int,
        *,
        download_bytes: int,
        upload_bytes: int,
        start_s: float,
    ) -> TaskTiming:
        """Return when a task started at ``start_s`` finishes, or when the device drops it.

        Parameters
        ----------
        examples
            The task's work: examples trained, counted once per epoch (examples * epochs).
        download_bytes, upload_bytes
            What the device fetches before training and sends after it.
        start_s
            When the task reaches the device, in trace seconds.

        Returns
        -------
        TaskTiming
            The phases' lengths and either the finish time or when the device
            went offline (its window closed before the upload was out) and when
            it is next online.
        """
        download_s = download_bytes * 8 / (self.down_mbps * BITS_PER_MBIT)
        compute_s = examples * self.compute_ms_per_example / 1000.0
        upload_s = upload_bytes * 8 / (self.up_mbps * BITS_PER_MBIT)
        start_s = float(start_s)
        phases = (start_s, download_s, compute_s, upload_s)
        until = self.availability.online_until(start_s)
        finish = start_s + download_s + compute_s + upload_s
        if until is not None and finish <= until:
            return TaskTiming(*phases, finish_s=finish)
        offline = start_s if until is None else until
        return TaskTiming(
            *phases,
            finish_s=None,
            offline_s=offline,
            next_online_s=self.availability.next_online(offline),
        )


@dataclass(frozen=True)
class Trace:
    """Many devices' traces; device ``i`` of a fleet plays entry ``i mod len(devices)``.

    Parameters
    ----------
    devices
        The entries, in file order.
    period_s
        The default period of the entries' windows.
    source
        Where the trace came from (generator settings, imported files).
    """

    devices: tuple[DeviceTrace, ...]
    period_s: float
    source: str = ""

    def __post_init__(self) -> None:
        if not self.devices:
            raise TraceError("a trace needs at least one device")

    def __len__(self) -> int:
        """Return how many entries the trace holds."""
        return len(self.devices)

    def device(self, index: int) -> DeviceTrace:
        """Return the entry fleet device ``index`` plays (``index mod len``)."""
        return self.devices[index % len(self.devices)]

    def online_count(self, t: float, indices: Sequence[int] | None = None) -> int:
        """Return how many of the fleet's devices ``indices`` (default: the entries) are online."""
        chosen = range(len(self.devices)) if indices is None else indices
        return sum(self.device(i).availability.online_at(t) for i in chosen)
