"""Server, two workers and a 20-device fleet as separate processes over RabbitMQ and Mosquitto.

The two workers share the update queue, each folding its share of every round;
the model they commit together equals ``fedmq simulate``'s (one worker, in process).
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
from model_store import LocalStore
from tests.brokers import AMQP_PORT, MQTT_PORT, amqp_url, delete_amqp_groups, mqtt_url, require
from tests.e2e.processes import (
    Api,
    deployment_env,
    free_port,
    max_difference,
    processes,
    rounds_when_done,
    start_fleet,
    start_service_and_worker,
    start_worker,
    wait_until,
)

ROUNDS = 5


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["rounds"]["count"] = ROUNDS
    return raw


@pytest.fixture(scope="module")
def in_process(config: dict[str, Any]) -> Any:
    return simulate(ExperimentConfig.from_dict(config))


@pytest.mark.parametrize("broker", ["amqp", "mqtt"])
def test_a_distributed_run_on_two_workers_commits_the_same_model_as_simulation(
    broker: str, tmp_path: Path, config: dict[str, Any], in_process: Any
) -> None:
    require(AMQP_PORT if broker == "amqp" else MQTT_PORT, broker)
    url = amqp_url() if broker == "amqp" else mqtt_url()
    port = free_port()
    env = deployment_env(tmp_path, url, port, f"e2e-{uuid.uuid4().hex[:8]}")
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group:
        start_service_and_worker(group, api, port, f"e2e-worker-{uuid.uuid4().hex[:8]}")
        start_worker(group, "worker-2", f"e2e-worker-{uuid.uuid4().hex[:8]}")
        experiment_id = api.call("POST", "/experiments", config)["id"]
        start_fleet(group, api, experiment_id, "--prefix", f"e2e{uuid.uuid4().hex[:6]}")
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})
        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS),
            240,
            f"{ROUNDS} rounds",
            group,
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
        rosters = [_roster(tmp_path, experiment_id, n) for n in range(1, ROUNDS + 1)]
    if broker == "amqp":
        delete_amqp_groups([env["FEDMQ_WORKER_GROUP"]])

    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS, group.logs()
    assert all(r["accepted"] == 20 for r in rounds)
    assert all(len(set(r["accepted_updates"])) == 20 for r in rounds)  # each counted once
    # Both workers took a share of the rounds' updates.
    assert any(len(workers) == 2 for workers in rosters), rosters
    expected = load(in_process.final_weights)
    assert set(final) == set(expected)
    worst = max_difference(final, expected)
    assert worst <= 1e-6, f"distributed and simulated models differ by {worst}"
    simulated_accuracy = in_process.final_metrics["accuracy"]
    assert rounds[-1]["metrics"]["accuracy"] == pytest.approx(simulated_accuracy, abs=1e-3)


def _roster(workdir: Path, experiment_id: str, number: int) -> set[str]:
    """Return the workers on a round's roster, as the local store holds it."""
    store = LocalStore(workdir / "store")
    roster = f"{experiment_id}.r{number}.roster"
    latest = store.latest_version(roster)
    manifests = [store.get_manifest(roster, v) for v in range(0 if latest is None else latest + 1)]
    return {m.metadata["worker"] for m in manifests if "worker" in m.metadata}


def test_distributed_fedbuff_commits_a_version_every_k_updates_without_a_barrier(
    tmp_path: Path, config: dict[str, Any]
) -> None:
    require(AMQP_PORT, "amqp")
    raw = copy.deepcopy(config)
    raw["strategy"] = {"name": "fedbuff", "buffer_size": 5, "max_staleness": 4}
    raw["rounds"] = {"count": 4, "devices_per_round": 10, "over_selection": 1.0}
    raw["training"]["epochs"] = 1
    port = free_port()
    env = deployment_env(tmp_path, amqp_url(), port, f"e2e-{uuid.uuid4().hex[:8]}")
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group:
        start_service_and_worker(group, api, port, f"e2e-worker-{uuid.uuid4().hex[:8]}")
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        prefix = f"fb{uuid.uuid4().hex[:6]}"
        start_fleet(group, api, experiment_id, "--prefix", prefix, "--profile", "heterogeneous")
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": 4})
        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, 4), 240, "4 fedbuff steps", group
        )
        experiment = api.call("GET", f"/experiments/{experiment_id}")
        fleet_log = group.log("fleet")
    delete_amqp_groups([env["FEDMQ_WORKER_GROUP"]])

    assert [(r["state"], r["base_version"], r["version"]) for r in rounds] == [
        ("committed", n, n + 1) for n in range(4)
    ], group.logs()
    assert all(r["accepted"] == 5 for r in rounds)
    updates = [u for r in rounds for u in r["accepted_updates"]]
    assert len(set(updates)) == 20  # each update folded into exactly one version
    assert experiment["model_version"] == 4
    # 10 tasks went out at once, and devices got new ones as they finished.
    assert len(rounds[0]["selected_devices"]) >= 10
    assert "speed profile heterogeneous" in fleet_log
