"""Device traces: the file format, its errors, availability windows and the time a task takes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from device_sdk.emulator.profiles import ProfileError, SpeedProfile, TraceProfile, load_profile
from device_sdk.emulator.traces import (
    Availability,
    DeviceTrace,
    Trace,
    TraceError,
    dump_trace,
    load_trace,
    parse_trace,
    save_trace,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "traces"
SHORT = FIXTURES / "short_trace.json"

GOOD: dict[str, Any] = {
    "format": "fedmq-device-trace",
    "version": 1,
    "period_s": 100,
    "devices": [
        {"id": "a", "compute_ms_per_example": 10, "down_mbps": 8, "up_mbps": 2},
        {
            "id": "b",
            "compute_ms_per_example": 1.5,
            "down_mbps": 80,
            "up_mbps": 20,
            "online": [[10, 20], [20, 30], [90, 100]],
            "charging": [[10, 20]],
        },
    ],
}


def _device(windows: tuple[tuple[float, float], ...], period: float = 100.0) -> DeviceTrace:
    # 10 ms/example; 8 Mbit/s down = 1 MB/s; 1 Mbit/s up = 125 kB/s
    return DeviceTrace("d", 10.0, 8.0, 1.0, Availability(windows, period))


def test_a_trace_file_reads_into_frozen_dataclasses_and_writes_back_identically(
    tmp_path: Path,
) -> None:
    trace = parse_trace(GOOD, origin="good.json")

    assert len(trace) == 2 and trace.period_s == 100.0
    a, b = trace.devices
    assert a.availability.always_on and a.availability.online_at(1e9)
    # touching windows merge into one
    assert b.availability.windows == ((10.0, 30.0), (90.0, 100.0))
    assert b.availability.charging_at(15) and not b.availability.charging_at(25)
    with pytest.raises(AttributeError):
        a.up_mbps = 3  # type: ignore[misc]
    save_trace(trace, tmp_path / "t.json")
    assert load_trace(tmp_path / "t.json") == trace
    assert dump_trace(load_trace(tmp_path / "t.json")) == dump_trace(trace)


def test_fleet_device_i_plays_entry_i_mod_len() -> None:
    trace = load_trace(SHORT)

    assert [trace.device(i).id for i in (0, 1, 4, 6, 23)] == [
        "fast",
        "too-slow",
        "fast",
        "leaves-mid-task",
        "joins-at-50s",
    ]


def _broken(path: list[Any], value: Any) -> dict[str, Any]:
    raw = copy.deepcopy(GOOD)
    target = raw
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["format"], "other", "'format' must be 'fedmq-device-trace'"),
        (["version"], 2, "'version' 2 is not supported"),
        (["colour"], "red", r"unknown field\(s\) \['colour'\]"),
        (["devices"], [], "'devices' must be a non-empty list"),
        (["devices", 1], 5, "device 1: expected an object"),
        (["devices", 1, "up_mpbs"], 2, r"device 1 \('b'\): unknown field\(s\) \['up_mpbs'\]"),
        (["devices", 0, "compute_ms_per_example"], -1, r"device 0 \('a'\): 'compute_ms_per"),
        (["devices", 0, "down_mbps"], KeyError, r"'down_mbps': expected a number, got None"),
        (["devices", 0, "up_mbps"], True, "'up_mbps': expected a number"),
        (["devices", 1, "online", 1], [30, 20], r"'online'\[1\]: \[30, 20\]: need 0 <= start"),
        (["devices", 1, "online", 2], [5, 8], r"'online'\[2\]: \[5, 8\] starts before"),
        (["devices", 1, "online", 2], [90, 101], r"end <= period_s \(100\)"),
        (["devices", 1, "online"], {"0": 1}, "'online': expected a list"),
        (["devices", 1, "charging", 0], [1], r"'charging'\[0\]: expected a \[start_s, end_s\]"),
        (["devices", 0, "period_s"], 0, r"device 0 \('a'\): 'period_s': expected a number > 0"),
    ],
)
def test_a_malformed_trace_is_refused_naming_file_device_and_field(
    tmp_path: Path, path: list[Any], value: Any, message: str
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_broken(path, value)))

    with pytest.raises(TraceError, match=message) as caught:
        load_trace(bad)
    with pytest.raises(ProfileError, match=message):
        load_profile(str(bad))  # a TraceError is a ProfileError: `--profile` reports it
    assert str(bad) in str(caught.value)


def test_unreadable_trace_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "cut.json").write_text('{"format": ')

    with pytest.raises(TraceError, match="cut.json is not valid JSON"):
        load_trace(tmp_path / "cut.json")
    with pytest.raises(TraceError, match="cannot read device trace"):
        load_trace(tmp_path / "absent.json")


def test_load_profile_sniffs_a_device_trace_and_still_reads_the_delay_map(tmp_path: Path) -> None:
    (tmp_path / "delays.json").write_text(json.dumps({"0": 2.5}))

    traced = load_profile(str(SHORT))
    delays = load_profile(str(tmp_path / "delays.json"))

    assert isinstance(traced, TraceProfile) and traced.name == "trace:short_trace.json"
    assert traced.summary(range(8)) == {"always on": 4, "windows": 4}
    assert type(delays) is SpeedProfile and delays.delay_s(0, 1.0) == 2.5


def test_a_task_finishes_after_download_compute_and_upload_inside_its_window() -> None:
    device = _device(((0.0, 50.0),))

    timing = device.task_timing(1000, download_bytes=2_000_000, upload_bytes=250_000, start_s=10.0)

    assert (timing.download_s, timing.compute_s, timing.upload_s) == pytest.approx((2, 10, 2))
    assert timing.completed and timing.finish_s == pytest.approx(24.0)
    assert timing.offline_s is None and timing.next_online_s is None


def test_a_window_closing_mid_task_drops_it_and_says_when_the_device_is_back() -> None:
    device = _device(((0.0, 20.0), (60.0, 70.0)))

    mid_task = device.task_timing(1000, download_bytes=2_000_000, upload_bytes=250_000, start_s=10)
    offline = device.task_timing(10, download_bytes=0, upload_bytes=0, start_s=30.0)
    after_last = device.task_timing(10, download_bytes=0, upload_bytes=0, start_s=80.0)

    assert not mid_task.completed and mid_task.finish_s is None
    assert (mid_task.offline_s, mid_task.next_online_s) == (20.0, 60.0)
    assert (offline.offline_s, offline.next_online_s) == (30.0, 60.0)  # offline on arrival
    assert (after_last.offline_s, after_last.next_online_s) == (80.0, 100.0)  # next period


def test_windows_repeat_each_period_and_run_on_across_the_wrap() -> None:
    night = Availability(((0.0, 20.0), (80.0, 100.0)), 100.0)
    device = DeviceTrace("n", 10.0, 8.0, 1.0, night)

    assert night.online_until(90.0) == 120.0  # 80..100 then 100..120
    assert night.online_until(250.0) is None and night.next_online(250.0) == 280.0
    assert night.online_at(1015.0) and not night.online_at(1050.0)
    timing = device.task_timing(2500, download_bytes=0, upload_bytes=0, start_s=95.0)
    assert timing.finish_s == pytest.approx(120.0)  # exactly at the close still counts
    assert Availability.always(100.0).online_until(5.0) == math.inf


def test_a_device_with_no_window_is_never_online() -> None:
    never = Availability((), 100.0)

    assert not never.online_at(0) and never.next_online(0) is None
    timing = _device(()).task_timing(1, download_bytes=0, upload_bytes=0, start_s=0)
    assert (timing.completed, timing.offline_s, timing.next_online_s) == (False, 0.0, None)


def test_a_trace_counts_who_is_online_and_needs_a_device() -> None:
    trace = parse_trace(GOOD)

    assert trace.online_count(15.0) == 2 and trace.online_count(50.0) == 1
    assert trace.online_count(50.0, range(4)) == 2  # devices 0 and 2 play entry "a"
    with pytest.raises(TraceError, match="at least one device"):
        Trace((), 10.0)


def test_the_traces_module_exports_exactly_what_it_lists() -> None:
    from device_sdk.emulator import traces

    public = {name for name in vars(traces) if not name.startswith("_")}

    assert all(hasattr(traces, name) for name in traces.__all__)
    assert {"Trace", "DeviceTrace", "load_trace", "synthesize", "AvailabilityDriver"} <= set(
        traces.__all__
    )
    assert set(traces.__all__) <= public
