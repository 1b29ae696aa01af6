"""A round of 1,000 devices over Mosquitto: server, worker and fleet as separate processes.

The fleet's 1,000 devices share one MQTT hub (one network thread for all their
sessions), so the fleet process stays at a handful of threads; with a paho
network thread and a dispatcher per device it would hold 2,000 and, above
~340 sessions, fail inside ``select()``. Every selected device must be
accepted. The model is small and each device holds one or two examples: the
test is about the fleet and the service at that scale, not about training.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

from fedmq.defaults import DEMO_CONFIG
from tests.brokers import MQTT_PORT, mqtt_url, require
from tests.e2e.processes import (
    Api,
    deployment_env,
    fleet_totals,
    processes,
    start_service_and_worker,
    wait_until,
)
from tests.ports import free_port

DEVICES = 1000


def _online(api: Api) -> int:
    counts: dict[str, int] = api.call("GET", "/devices?limit=1")["counts"]
    return counts["online"]


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def test_a_round_of_a_thousand_devices_commits_with_every_device_accepted(
    tmp_path: Path,
) -> None:
    require(MQTT_PORT, "mqtt")
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = 11
    raw["model"]["hidden"] = [16]
    raw["data"].update(devices=DEVICES, partition="iid")
    raw["rounds"].update(
        count=1, devices_per_round=DEVICES, min_reports=DEVICES, over_selection=1.0
    )
    raw["rounds"]["deadline_s"] = 120.0
    raw["training"].update(epochs=1, batch_size=2)
    namespace = f"k{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = deployment_env(
        tmp_path, mqtt_url(), port, f"{namespace}-aggregators", FEDMQ_NAMESPACE=namespace
    )
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group:
        start_service_and_worker(group, api, port, f"{namespace}-worker")
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        fleet = group.start(
            "fleet", "fleet", "--devices", str(DEVICES), "--experiment", experiment_id
        )
        wait_until(lambda: _online(api) == DEVICES, 180, "1,000 devices online", group)
        fleet_threads = _threads(fleet.pid)

        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": 1})
        rounds = wait_until(
            lambda: [
                r
                for r in api.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
                if r["state"] != "training"
            ],
            240,
            "the round to end",
            group,
        )
        page = api.call("GET", f"/experiments/{experiment_id}/rounds/1/devices?limit=1000")
        group.stop()
        totals = fleet_totals(group, "fleet")

    (only,) = rounds
    assert only["state"] == "committed", only
    assert only["selected"] == only["accepted"] == DEVICES, only
    assert sum(1 for d in page["devices"] if d["accepted"]) == DEVICES
    assert totals["tasks"] == totals["updates_sent"] == DEVICES, totals
    assert fleet_threads < 40, fleet_threads  # a thread or two per device would be 1,000+
