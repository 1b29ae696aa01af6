"""The production shape: phones on MQTT, workers on AMQP, one RabbitMQ with its MQTT plugin.

A private RabbitMQ node (the shipped ``deploy/rabbitmq/rabbitmq.conf``: the
plugin publishes to the ``fedmq`` exchange, MQTT 3.1.1 on Debian's 3.10) carries
both protocols. The server and two workers speak AMQP, the 20-device fleet
speaks MQTT; the topic names map onto one routing key in both, so updates a
device publishes over MQTT land in the workers' AMQP group queue and tasks the
service publishes over AMQP reach each device's MQTT session. The model equals
``fedmq simulate``'s.
"""

from __future__ import annotations

import copy
import secrets
import uuid
from pathlib import Path
from typing import Any

from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
from tests.e2e.owned_brokers import owned_rabbitmq, shipped_rabbitmq_config
from tests.e2e.processes import (
    SEED,
    Api,
    deployment_env,
    max_difference,
    processes,
    rounds_when_done,
    start_fleet,
    start_service_and_worker,
    start_worker,
    wait_until,
)
from tests.ports import free_port

ROUNDS = 3


def test_devices_on_mqtt_and_workers_on_amqp_through_one_rabbitmq(tmp_path: Path) -> None:
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["rounds"]["count"] = ROUNDS
    password = secrets.token_urlsafe(16)
    plugins = ("rabbitmq_mqtt",)
    with owned_rabbitmq(tmp_path / "rabbitmq", shipped_rabbitmq_config(password), plugins) as node:
        amqp = f"amqp://admin:{password}@127.0.0.1:{node.port}/%2F"
        mqtt = f"mqtt://admin:{password}@127.0.0.1:{node.mqtt_port}?protocol=3.1.1"
        port = free_port()
        env = deployment_env(tmp_path, amqp, port, f"shape-{uuid.uuid4().hex[:8]}")
        api = Api(env["FEDMQ_SERVER_URL"])
        with processes(tmp_path, env) as group:
            # The server declares the fedmq exchange the MQTT plugin publishes to.
            start_service_and_worker(group, api, port, f"shape-w1-{uuid.uuid4().hex[:6]}")
            start_worker(group, "worker-2", f"shape-w2-{uuid.uuid4().hex[:6]}")
            experiment_id = api.call("POST", "/experiments", raw)["id"]
            start_fleet(group, api, experiment_id, "--prefix", "shape", "--broker", mqtt)
            api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})
            rounds = wait_until(
                lambda: rounds_when_done(api, experiment_id, ROUNDS), 240, "rounds", group
            )
            final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
            fleet_log = group.log("fleet")

    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS, group.logs()
    assert all(r["accepted"] == 20 for r in rounds)
    assert all(len(set(r["accepted_updates"])) == 20 for r in rounds)
    assert f"fedmq fleet: 20 devices for {experiment_id} on mqtt://" in fleet_log
    assert "amqp://" not in fleet_log
    expected = load(simulate(ExperimentConfig.from_dict(raw)).final_weights)
    worst = max_difference(final, expected)
    assert worst <= 1e-6, f"the two-protocol run differs from simulation by {worst}"
