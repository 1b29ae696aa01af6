"""Secure aggregation with Python devices and emulated phones, over Mosquitto.

The phones (ExecuTorch on the emulated Android and iOS devices) go through
the same stages as the Python devices: keys, shares, a masked update,
reveals. The committed models equal the all-Python secure simulation's
within the quantisation error and the runtimes' float32 differences.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
from tests.brokers import MQTT_PORT, mqtt_url, require
from tests.e2e.processes import (
    SEED,
    Api,
    deployment_env,
    fleet_totals,
    max_difference,
    processes,
    rounds_when_done,
    start_worker,
    wait_checked_in,
    wait_healthy,
    wait_until,
)
from tests.ports import free_port

ROUNDS = 2
DEVICES = 6


def test_python_devices_and_phones_complete_secure_rounds_over_mosquitto(tmp_path: Path) -> None:
    require(MQTT_PORT, "mqtt")
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["model"]["platforms"] = ["android", "ios"]
    raw["data"]["devices"] = DEVICES
    raw["rounds"].update(count=ROUNDS, devices_per_round=DEVICES, min_reports=DEVICES)
    raw["training"]["epochs"] = 2
    raw["secure_aggregation"] = {}
    expected = simulate(ExperimentConfig.from_dict(raw))
    port = free_port()
    env = deployment_env(tmp_path, mqtt_url(), port, f"secmix-{uuid.uuid4().hex[:8]}")
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group:
        group.start("server", "-v", "server", "--port", str(port))  # -v: its INFO lines
        wait_healthy(group, api)
        start_worker(group, "worker", f"secmix-worker-{uuid.uuid4().hex[:8]}")
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        fleet = group.start(
            "fleet",
            "fleet",
            *("--devices", str(DEVICES), "--prefix", f"secmix{uuid.uuid4().hex[:6]}"),
            *("--experiment", experiment_id, "--platforms", "python,android,ios"),
        )
        wait_checked_in(group, api, DEVICES)
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})
        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS), 240, "secure rounds", group
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
        maps = Path(f"/proc/{fleet.pid}/maps").read_text()
        server_log = group.log("server")
    totals = fleet_totals(group, "fleet")

    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS, group.logs()
    assert all(r["accepted"] == DEVICES for r in rounds), rounds
    # Every device, phones included, sent its update masked and revealed its shares.
    assert totals["updates_sent"] == ROUNDS * DEVICES, totals
    assert server_log.count(f"unmasking ready ({DEVICES} seeds, 0 pair seeds)") == ROUNDS
    assert "libexecutorch.so" in maps  # the phones trained on ExecuTorch's runtime
    worst = max_difference(final, load(expected.final_weights))
    assert worst <= 1e-4, f"the secure mixed fleet's model is {worst} from the simulation's"
