"""Two deployments in two namespaces on one shared broker at once: neither sees the other.

Each has its own server, worker and 20-device fleet as processes, and its own
seed; both run at the same time, and each must commit exactly its own
``fedmq simulate`` model. Had a worker folded the other deployment's
updates, or a coordinator counted its devices, the models would differ.
"""

from __future__ import annotations

import copy
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
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
    wait_until,
)
from tests.ports import free_port

ROUNDS = 2
SEEDS = (SEED, SEED + 1)


def _config(seed: int) -> dict[str, Any]:
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = seed
    raw["rounds"]["count"] = ROUNDS
    raw["training"]["epochs"] = 2
    return raw


@pytest.fixture(scope="module")
def expected() -> dict[int, Any]:
    return {
        seed: load(simulate(ExperimentConfig.from_dict(_config(seed))).final_weights)
        for seed in SEEDS
    }


@pytest.mark.parametrize("broker", ["mqtt", "amqp"])
def test_two_namespaces_on_one_broker_run_side_by_side(
    broker: str, tmp_path: Path, expected: dict[int, Any]
) -> None:
    require(AMQP_PORT if broker == "amqp" else MQTT_PORT, broker)
    url = amqp_url() if broker == "amqp" else mqtt_url()
    runs: list[tuple[int, Api, str, Any]] = []
    with ExitStack() as stack:
        for seed in SEEDS:
            namespace = f"ns{seed}x{uuid.uuid4().hex[:8]}"
            workdir = tmp_path / namespace
            workdir.mkdir()
            port = free_port()
            env = deployment_env(
                workdir, url, port, f"{namespace}-aggregators", FEDMQ_NAMESPACE=namespace
            )
            group = stack.enter_context(processes(workdir, env))
            api = Api(env["FEDMQ_SERVER_URL"])
            start_service_and_worker(group, api, port, f"{namespace}-worker")
            experiment_id = api.call("POST", "/experiments", _config(seed))["id"]
            # The same device ids in both: only the namespace keeps them apart.
            start_fleet(group, api, experiment_id, "--prefix", "shared")
            runs.append((seed, api, experiment_id, group))
        for _, api, experiment_id, _ in runs:
            api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})
        finals = {}
        for seed, api, experiment_id, group in runs:
            rounds = wait_until(
                lambda a=api, e=experiment_id: rounds_when_done(a, e, ROUNDS), 240, "rounds", group
            )
            assert [r["state"] for r in rounds] == ["committed"] * ROUNDS, group.logs()
            assert all(r["accepted"] == 20 for r in rounds), group.logs()
            assert len(api.call("GET", "/devices")["devices"]) == 20
            finals[seed] = load(api.call("GET", f"/experiments/{experiment_id}/model"))

    for seed in SEEDS:
        worst = max_difference(finals[seed], expected[seed])
        assert worst <= 1e-6, f"namespace of seed {seed} differs from its simulation by {worst}"
    assert max_difference(*finals.values()) > 1e-3  # two different runs, not one twice
