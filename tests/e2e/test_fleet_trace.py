"""`fedmq fleet --trace`: devices leave and rejoin the service's pool as their windows say.

Server and fleet are processes on Mosquitto in a namespace of their own. The
trace has two kinds of device: one always online, one whose first window
closes 6 s after the fleet starts and whose next one opens at 14 s. The fleet
plays entry ``i mod 2`` for device ``i``, so devices 1 and 3 go offline and
come back while 0 and 2 stay.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

from device_sdk.emulator import device_name
from fedmq.defaults import DEMO_CONFIG
from tests.brokers import MQTT_PORT, mqtt_url, require
from tests.e2e.processes import Api, deployment_env, processes, wait_healthy, wait_until
from tests.ports import free_port

TRACE = {
    "format": "fedmq-device-trace",
    "version": 1,
    "period_s": 1000,
    "source": "tests: one device always on, one away from 6 s to 14 s",
    "devices": [
        {"id": "always", "compute_ms_per_example": 1, "down_mbps": 100, "up_mbps": 50},
        {
            "id": "away",
            "compute_ms_per_example": 1,
            "down_mbps": 100,
            "up_mbps": 50,
            "online": [[0, 6], [14, 1000]],
        },
    ],
}
LEAVING = (1, 3)
STAYING = (0, 2)


def _states(api: Api) -> dict[str, str]:
    devices: list[dict[str, Any]] = api.call("GET", "/devices")["devices"]
    return {d["id"]: d["state"] for d in devices if d["last_seen"]}


def test_fleet_trace_takes_devices_offline_and_back_as_the_trace_says(tmp_path: Path) -> None:
    require(MQTT_PORT, "mqtt")
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["data"]["devices"] = 4
    raw["rounds"].update(devices_per_round=4, min_reports=2)
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(TRACE))
    namespace = f"trace{uuid.uuid4().hex[:8]}"
    # A fleet in a namespace of its own names its devices after it (MQTT client ids are
    # broker-wide): fedmq fleet's default prefix.
    leaving = [device_name(i, f"{namespace}-emu") for i in LEAVING]
    staying = [device_name(i, f"{namespace}-emu") for i in STAYING]
    port = free_port()
    env = deployment_env(
        tmp_path, mqtt_url(), port, f"{namespace}-aggregators", FEDMQ_NAMESPACE=namespace
    )
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group:
        group.start("server", "server", "--port", str(port))
        wait_healthy(group, api)
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        group.start(
            "fleet", "fleet", "--devices", "4", "--experiment", experiment_id, "--trace", str(trace)
        )
        started = time.monotonic()
        wait_until(lambda: len(_states(api)) == 4, 30, "4 devices to check in", group)
        online_after = time.monotonic() - started  # the trace's clock runs by now
        everyone = _states(api)
        assert set(everyone.values()) == {"online"}, everyone

        away = wait_until(
            lambda: (s := _states(api)) and all(s[d] == "offline" for d in leaving) and s,
            20,
            "devices 1 and 3 to go offline",
            group,
        )
        left_after = time.monotonic() - started
        assert all(away[d] == "online" for d in staying), away

        back = wait_until(
            lambda: (s := _states(api)) and all(s[d] == "online" for d in leaving) and s,
            30,
            "devices 1 and 3 to come back",
            group,
        )
        back_after = time.monotonic() - started
        assert all(back[d] == "online" for d in staying), back

    # The windows are trace seconds from the fleet's start, which falls between
    # ``started`` and the devices' first check-ins: nothing moves early, and
    # each move comes within a few seconds (polling) of its trace time.
    assert left_after >= 6.0 and left_after - online_after < 9.0, (online_after, left_after)
    assert back_after >= 14.0 and back_after - online_after < 17.0, (online_after, back_after)
    assert back_after - left_after >= 6.0, (left_after, back_after)  # 8 s away
