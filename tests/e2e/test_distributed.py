"""Server, two or three workers and a 20-device fleet as processes over RabbitMQ and Mosquitto.

The workers share the update queue, each folding its share of every round;
the model they commit together equals ``fedmq simulate``'s (one worker, in
process). The cases cover each strategy family the issue names (fedavg,
fedadam, scaffold; fedbuff below), each broker and both worker counts, with a
seed other than the one a process falls back to.
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
from tests.brokers import AMQP_PORT, MQTT_PORT, amqp_url, mqtt_url, require
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

ROUNDS = 4
CASES = [
    ("amqp", 2, {"name": "fedavg"}),
    ("mqtt", 3, {"name": "fedavg"}),
    ("mqtt", 2, {"name": "fedadam", "eta": 0.01}),
    ("amqp", 3, {"name": "scaffold", "num_clients": 20}),
]


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["rounds"]["count"] = ROUNDS
    raw["training"]["epochs"] = 1
    return raw


@pytest.mark.parametrize(
    ("broker", "workers", "strategy"),
    CASES,
    ids=[f"{b}-{w}workers-{s['name']}" for b, w, s in CASES],
)
def test_a_distributed_run_on_several_workers_commits_the_same_model_as_simulation(
    broker: str, workers: int, strategy: dict[str, Any], tmp_path: Path, config: dict[str, Any]
) -> None:
    require(AMQP_PORT if broker == "amqp" else MQTT_PORT, broker)
    config = {**config, "strategy": strategy}
    in_process = simulate(ExperimentConfig.from_dict(config))
    url = amqp_url() if broker == "amqp" else mqtt_url()
    port = free_port()
    env = deployment_env(tmp_path, url, port, f"e2e-{uuid.uuid4().hex[:8]}")
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group:
        start_service_and_worker(group, api, port, f"e2e-worker-{uuid.uuid4().hex[:8]}")
        for number in range(2, workers + 1):
            start_worker(group, f"worker-{number}", f"e2e-worker-{uuid.uuid4().hex[:8]}")
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

    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS, group.logs()
    assert all(r["accepted"] == 20 for r in rounds)
    assert all(len(set(r["accepted_updates"])) == 20 for r in rounds)  # each counted once
    # Every worker took a share of the rounds' updates.
    assert max(len(r) for r in rosters) == workers, rosters
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


@pytest.mark.parametrize(("broker", "workers"), [("amqp", 2), ("mqtt", 3)])
def test_distributed_fedbuff_steps_shared_by_workers_count_every_update_once(
    broker: str, workers: int, tmp_path: Path, config: dict[str, Any]
) -> None:
    require(AMQP_PORT if broker == "amqp" else MQTT_PORT, broker)
    raw = copy.deepcopy(config)
    raw["strategy"] = {"name": "fedbuff", "buffer_size": 5, "max_staleness": 4}
    raw["rounds"] = {"count": 4, "devices_per_round": 10, "over_selection": 1.0}
    port = free_port()
    url = amqp_url() if broker == "amqp" else mqtt_url()
    env = deployment_env(tmp_path, url, port, f"e2e-{uuid.uuid4().hex[:8]}")
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group:
        start_service_and_worker(group, api, port, f"e2e-worker-{uuid.uuid4().hex[:8]}")
        for number in range(2, workers + 1):
            start_worker(group, f"worker-{number}", f"e2e-worker-{uuid.uuid4().hex[:8]}")
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        prefix = f"fb{uuid.uuid4().hex[:6]}"
        start_fleet(group, api, experiment_id, "--prefix", prefix, "--profile", "heterogeneous")
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": 4})
        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, 4), 240, "4 fedbuff steps", group
        )
        experiment = api.call("GET", f"/experiments/{experiment_id}")
        fleet_log = group.log("fleet")
        rosters = [_roster(tmp_path, experiment_id, n) for n in range(1, 5)]

    assert [(r["state"], r["base_version"], r["version"]) for r in rounds] == [
        ("committed", n, n + 1) for n in range(4)
    ], group.logs()
    # Shares fold until they hear of the close, so a step may hold a few more than K.
    assert all(r["accepted"] >= 5 for r in rounds)
    updates = [u for r in rounds for u in r["accepted_updates"]]
    assert len(updates) == len(set(updates))  # each update folded into exactly one version
    assert max(len(r) for r in rosters) >= 2, rosters  # the steps were shared
    assert experiment["model_version"] == 4
    # 10 tasks went out at once, and devices got new ones as they finished.
    assert len(rounds[0]["selected_devices"]) >= 10
    assert "fedmq fleet: speed profile heterogeneous: " in fleet_log
