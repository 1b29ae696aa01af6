"""Synthetic device traces: heavy-tailed speeds and diurnal availability under a seed.

Each device draws from a numpy ``Generator`` seeded by ``[seed, index]``, so
device ``i`` is the same in a fleet of 10 and of 10,000, and the same seed
gives the same file, byte for byte. The trace starts at local midnight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from device_sdk.emulator._trace_model import Availability, DeviceTrace, Trace, TraceError, Window

DAY_S = 86400.0
HOUR_S = 3600.0
_STREAM = 0x7EACE
"""Keeps these draws apart from other draws seeded by ``[seed, index]``."""


@dataclass(frozen=True)
class SynthSettings:
    """The distributions a synthetic trace draws from (defaults: see docs/traces.md).

    Parameters
    ----------
    compute_median_ms, compute_sigma
        Log-normal training cost in ms per example: median and sigma of its log.
        Sigma 0.9 puts the 90th percentile about 10x above the 10th, the spread
        FedScale's device data shows between fast and slow phones.
    down_median_mbps, down_sigma
        Log-normal download bandwidth in Mbit/s.
    up_ratio_median, up_ratio_sigma
        Upload bandwidth as a log-normal share of the download (capped at 1).
    always_on
        Share of devices online all the time (plugged-in tablets, edge boxes).
    night_share
        Share of the other devices that charge overnight, online meanwhile.
    night_start_h, night_start_sd_h, night_hours, night_hours_sd
        The overnight window: normal start hour and length.
    day_windows
        Mean number (Poisson) of short daytime windows a day.
    day_minutes_median, day_minutes_sigma
        Log-normal length of a daytime window in minutes.
    day_charging
        Chance that a daytime window is spent charging.
    """

    compute_median_ms: float = 25.0
    compute_sigma: float = 0.9
    down_median_mbps: float = 25.0
    down_sigma: float = 0.8
    up_ratio_median: float = 0.25
    up_ratio_sigma: float = 0.4
    always_on: float = 0.1
    night_share: float = 0.85
    night_start_h: float = 23.0
    night_start_sd_h: float = 1.5
    night_hours: float = 7.0
    night_hours_sd: float = 1.0
    day_windows: float = 2.0
    day_minutes_median: float = 30.0
    day_minutes_sigma: float = 0.8
    day_charging: float = 0.25


def synthesize(
    devices: int,
    *,
    seed: int = 0,
    hours: float = 24.0,
    settings: SynthSettings | None = None,
) -> Trace:
    """Return a synthetic trace of ``devices`` devices over ``hours`` hours (its period).

    Parameters
    ----------
    devices
        How many entries.
    seed
        Fixes every draw: the same seed gives the same trace.
    hours
        The trace's length; it repeats after that.
    settings
        The distributions (default: ``SynthSettings()``).

    Returns
    -------
    Trace
        Values rounded (ms and Mbit/s to 0.01, window times to whole seconds),
        so that writing and reading the trace gives it back exactly.
    """
    chosen = settings or SynthSettings()
    if devices < 1 or not hours > 0:
        raise TraceError(f"a synthetic trace needs devices >= 1 and hours > 0: {devices}, {hours}")
    if not 0 <= chosen.always_on <= 1:
        raise TraceError(f"always_on must be a share in [0, 1], got {chosen.always_on}")
    period = float(round(hours * HOUR_S))
    rows = tuple(_device(i, seed, period, chosen) for i in range(devices))
    source = (
        f"synthetic: seed {seed}, {devices} devices, {hours:g} h, always-on {chosen.always_on:g}"
    )
    return Trace(rows, period, source)


def _device(index: int, seed: int, period: float, s: SynthSettings) -> DeviceTrace:
    """Draw device ``index``'s speeds and windows."""
    rng = np.random.default_rng([seed, index, _STREAM])
    compute = rng.lognormal(math.log(s.compute_median_ms), s.compute_sigma)
    down = rng.lognormal(math.log(s.down_median_mbps), s.down_sigma)
    up = down * min(rng.lognormal(math.log(s.up_ratio_median), s.up_ratio_sigma), 1.0)
    if rng.random() < s.always_on:
        availability = Availability(((0.0, period),), period, ((0.0, period),))
    else:
        online, charging = _diurnal(rng, period, s)
        availability = Availability(online, period, charging)
    return DeviceTrace(
        f"syn-{index:05d}",
        max(round(float(compute), 2), 0.01),
        max(round(float(down), 2), 0.01),
        max(round(float(up), 2), 0.01),
        availability,
    )


def _diurnal(
    rng: np.random.Generator, period: float, s: SynthSettings
) -> tuple[tuple[Window, ...], tuple[Window, ...]]:
    """Draw a device's online and charging windows, day by day, clipped to the period."""
    online: list[Window] = []
    charging: list[Window] = []
    for day in range(-1, math.ceil(period / DAY_S) + 1):
        base = day * DAY_S
        if rng.random() < s.night_share:
            start = np.clip(rng.normal(s.night_start_h, s.night_start_sd_h), 20.0, 27.0)
            length = np.clip(rng.normal(s.night_hours, s.night_hours_sd), 3.0, 10.0)
            window = (base + start * HOUR_S, base + (start + length) * HOUR_S)
            online.append(window)
            charging.append(window)
        for _ in range(min(int(rng.poisson(s.day_windows)), 6)):
            start = rng.uniform(7.0, 22.0) * HOUR_S
            minutes = rng.lognormal(math.log(s.day_minutes_median), s.day_minutes_sigma)
            window = (base + start, base + start + float(np.clip(minutes, 2, 240)) * 60.0)
            online.append(window)
            if rng.random() < s.day_charging:
                charging.append(window)
    return _clip(online, period), _clip(charging, period)


def _clip(windows: list[Window], period: float) -> tuple[Window, ...]:
    """Return windows rounded to seconds, clipped to ``[0, period]``, sorted and merged."""
    merged: list[Window] = []
    for start, end in sorted((round(float(a)), round(float(b))) for a, b in windows):
        start, end = max(start, 0), min(end, int(period))
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], float(end)))
        else:
            merged.append((float(start), float(end)))
    return tuple(merged)
