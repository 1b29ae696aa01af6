"""The synthetic trace generator: deterministic under a seed, realistic in its spreads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_sdk.emulator.traces import SynthSettings, Trace, load_trace, main, synthesize

HOUR = 3600.0


@pytest.fixture(scope="module")
def fleet() -> Trace:
    return synthesize(2000, seed=11)


def test_the_same_seed_writes_the_same_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    def generate(seed: int, name: str) -> bytes:
        out = tmp_path / name
        argv = ["generate", "--devices", "50", "--seed", str(seed), "--hours", "24"]
        assert main([*argv, "--out", str(out)]) == 0
        return out.read_bytes()

    first, again, other = generate(3, "a.json"), generate(3, "b.json"), generate(4, "c.json")

    assert first == again
    assert first != other
    assert load_trace(tmp_path / "a.json") == synthesize(50, seed=3)


def test_a_device_draws_the_same_whatever_the_fleet_size() -> None:
    small, large = synthesize(5, seed=9), synthesize(40, seed=9)

    assert small.devices == large.devices[:5]


def test_compute_is_log_normal_with_an_order_of_magnitude_between_fast_and_slow(
    fleet: Trace,
) -> None:
    ms = np.array([d.compute_ms_per_example for d in fleet.devices])
    p10, p50, p90 = np.percentile(ms, [10, 50, 90])

    assert 21 < p50 < 30  # median 25 ms per example
    assert 7 < p90 / p10 < 14  # sigma 0.9: exp(2 * 1.2816 * 0.9) = 10.0
    assert ms.max() / p50 > 8  # a heavy right tail
    assert abs(np.mean(np.log(ms)) - np.log(25)) < 0.06


def test_bandwidth_is_log_normal_and_uploads_are_slower(fleet: Trace) -> None:
    down = np.array([d.down_mbps for d in fleet.devices])
    up = np.array([d.up_mbps for d in fleet.devices])

    assert 21 < np.median(down) < 30
    assert 4 < np.median(up) < 8  # about a quarter of the download
    assert (up <= down).all()
    assert np.percentile(down, 90) / np.percentile(down, 10) > 5


def test_availability_is_diurnal_with_an_always_on_share(fleet: Trace) -> None:
    n = len(fleet)
    always = sum(d.availability.always_on for d in fleet.devices) / n
    night = fleet.online_count(3 * HOUR) / n
    afternoon = fleet.online_count(15 * HOUR) / n
    windows = [len(d.availability.windows) for d in fleet.devices if not d.availability.always_on]

    assert 0.08 < always < 0.12
    assert 0.7 < night < 0.95  # charging overnight
    assert 0.1 < afternoon < 0.35
    assert 2 <= np.median(windows) <= 4  # a few windows a day
    night_charging = [d.availability.charging_at(3 * HOUR) for d in fleet.devices]
    assert sum(night_charging) / n > 0.7


def test_settings_and_a_shorter_period_are_honoured() -> None:
    trace = synthesize(300, seed=1, hours=6, settings=SynthSettings(always_on=1.0))

    assert trace.period_s == 6 * HOUR
    assert all(d.availability.always_on for d in trace.devices)
    assert all(d.availability.charging_at(100.0) for d in trace.devices)


def test_the_command_line_has_an_example_and_refuses_bad_counts(
    tmp_path: Path, capsys: Any
) -> None:
    with pytest.raises(SystemExit) as shown:
        main(["generate", "--help"])
    assert shown.value.code == 0
    assert "example: generate --devices 1000 --seed 7" in capsys.readouterr().out

    status = main(["generate", "--devices", "0", "--out", str(tmp_path / "x.json")])

    assert status == 1 and "devices >= 1" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_describe_prints_percentiles_and_who_is_online(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "t.json"
    main(["generate", "--devices", "200", "--seed", "2", "--out", str(out)])
    capsys.readouterr()

    assert main(["describe", str(out)]) == 0

    text = capsys.readouterr().out
    assert "200 devices, period 24 h" in text and "compute ms/example" in text
    assert "online at 03:00" in text
