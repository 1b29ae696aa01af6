"""Importing FedScale's device traces from their JSON form (never from pickle)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from device_sdk.emulator.traces import (
    TraceError,
    from_fedscale,
    load_fedscale,
    load_trace,
    main,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "traces"
CAPACITY = FIXTURES / "fedscale_client_device_capacity.json"
BEHAVIOR = FIXTURES / "fedscale_client_behave_trace.json"


def test_capacity_and_behavior_pair_up_in_file_order_as_fedscale_maps_clients() -> None:
    trace = load_fedscale(CAPACITY, BEHAVIOR)

    assert [d.id for d in trace.devices] == [
        "fedscale-1-501",
        "fedscale-2-77",
        "fedscale-7-501",
    ]
    first, second, third = trace.devices
    # training costs 3x FedScale's inference latency; kbit/s become Mbit/s, both ways
    assert first.compute_ms_per_example == pytest.approx(37.5)
    assert (first.down_mbps, first.up_mbps) == (2.4, 2.4)
    assert third.compute_ms_per_example == pytest.approx(420.75) and third.down_mbps == 12.0
    # active[i]..inactive[i] windows, the last clipped to finish_time, the period
    assert first.availability.windows == ((1000, 3000), (5000, 9000), (17000, 18000))
    assert first.availability.period_s == 18000 and first.model == "SM-G930F"
    assert second.availability.always_on and second.availability.period_s == 86400
    assert first.availability.online_at(18000 + 1500)  # repeats every finish_time


def test_the_imported_trace_is_a_valid_trace_file(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "fedscale.json"

    status = main(
        [
            "import-fedscale",
            "--capacity",
            str(CAPACITY),
            "--behavior",
            str(BEHAVIOR),
            "--devices",
            "5",
            "--out",
            str(out),
        ]
    )

    assert status == 0 and "5 devices" in capsys.readouterr().out
    trace = load_trace(out)
    assert trace == load_fedscale(CAPACITY, BEHAVIOR, devices=5)
    assert json.loads(out.read_text())["devices"][1]["period_s"] == 86400  # its own period


def test_without_a_behavior_file_every_device_is_always_online() -> None:
    trace = load_fedscale(CAPACITY)

    assert len(trace) == 3 and all(d.availability.always_on for d in trace.devices)
    assert trace.devices[1].id == "fedscale-2"


@pytest.mark.parametrize(
    ("capacity", "behavior", "message"),
    [
        ([1, 2], None, "capacity.json: expected a non-empty object"),
        ({"4": 17}, None, "client '4': expected an object"),
        ({"4": {"communication": 10}}, None, "client '4': missing field 'computation'"),
        (
            {"4": {"computation": 0, "communication": 1}},
            None,
            "'computation': expected a number > 0",
        ),
        (
            {"4": {"computation": 1, "communication": 1}},
            {"9": {"active": [0, 5], "inactive": [3], "finish_time": 10}},
            "behave.json: client '9': 'active' has 2 times, 'inactive' 1",
        ),
        (
            {"4": {"computation": 1, "communication": 1}},
            {"9": {"active": [4], "inactive": [3], "finish_time": 10}},
            r"client '9': window 0 \[4, 3\]: need 0 <= active <= inactive",
        ),
        (
            {"4": {"computation": 1, "communication": 1}},
            {"9": {"active": [0, 2], "inactive": [5, 6], "finish_time": 10}},
            r"client '9': windows\[1\]: \[2.0, 6.0\] starts before the previous window ends",
        ),
        (
            {"4": {"computation": 1, "communication": 1}},
            {"9": {"active": [0], "inactive": [5]}},
            "client '9': missing field 'finish_time'",
        ),
    ],
)
def test_bad_fedscale_input_is_refused_naming_file_and_client(
    capacity: Any, behavior: Any, message: str
) -> None:
    with pytest.raises(TraceError, match=message):
        from_fedscale(capacity, behavior, origins=("capacity.json", "behave.json"))


def test_a_pickle_is_never_read(tmp_path: Path) -> None:
    pickled = tmp_path / "client_device_capacity"
    pickled.write_bytes(b"\x80\x04\x95\x00")  # a pickle header: refused as not JSON

    with pytest.raises(TraceError, match="is not valid JSON"):
        load_fedscale(pickled)
