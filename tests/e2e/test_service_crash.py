"""kill -9 of the service mid-round, over RabbitMQ: the restarted service picks the round up."""

from __future__ import annotations

import copy
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
from tests.brokers import (
    AMQP_PORT,
    MQTT_PORT,
    amqp_url,
    delete_amqp_groups,
    mqtt_url,
    require,
)
from tests.e2e.processes import (
    Api,
    deployment_env,
    free_port,
    max_difference,
    processes,
    rounds_when_done,
    start_fleet,
    wait_until,
)

ROUNDS = 3


@pytest.mark.parametrize("broker", ["amqp", "mqtt"])
def test_a_service_killed_mid_round_recovers_the_round_and_the_experiment(
    tmp_path: Path, broker: str
) -> None:
    require(AMQP_PORT if broker == "amqp" else MQTT_PORT, broker)
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["rounds"]["count"] = ROUNDS
    port = free_port()
    group = f"svc-crash-{uuid.uuid4().hex[:8]}"
    env = deployment_env(
        tmp_path,
        amqp_url() if broker == "amqp" else mqtt_url(),
        port,
        group,
        FEDMQ_SIGNING_KEY="a-signing-key-that-survives-restarts",
    )
    server_args = ("server", "--port", str(port), "--recovery-grace", "3")
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group_of:
        first = group_of.start("server-1", *server_args)
        api.wait_healthy()  # the server has written the service key the worker pins
        group_of.start("worker", "worker", "--name", f"w-{group}")
        wait_until(lambda: "fedmq worker on" in group_of.log("worker"), 60, "the worker", group_of)
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        start_fleet(
            group_of,
            api,
            experiment_id,
            "--concurrency",
            "1",
            "--heartbeat",
            "1",
            "--prefix",
            f"svc{uuid.uuid4().hex[:4]}",
        )
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})

        wait_until(lambda: _round_training(api, experiment_id, 2), 120, "round 2", group_of)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        del group_of.children["server-1"]
        group_of.start("server-2", "-v", *server_args)
        api.wait_healthy()

        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS),
            240,
            f"{ROUNDS} rounds after the restart",
            group_of,
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
        recovered = "recovered" in group_of.log("server-2")
    if broker == "amqp":
        delete_amqp_groups([group])

    assert recovered, "the restarted service should have picked up round 2"
    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS
    for record in rounds:
        assert record["accepted"] == 20 and len(set(record["accepted_updates"])) == 20
    expected = load(simulate(ExperimentConfig.from_dict(raw)).final_weights)
    worst = max_difference(final, expected)
    assert worst <= 1e-6, f"the restart changed the model by {worst}"


def _round_training(api: Api, experiment_id: str, number: int) -> bool:
    rounds = api.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
    return any(r["round"] == number and r["state"] == "training" for r in rounds)
