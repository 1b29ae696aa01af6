"""An aggregation tree across three brokers, every party a process of its own.

The root (server and one worker, which combines) is on RabbitMQ over AMQP;
region ``east`` is the shared Mosquitto, region ``west`` a private one. Each
region has its half of the fleet, an edge worker and a bridge to the root.
No process but the edge workers sees a device's update, and the committed
model equals ``fedmq simulate``'s.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path

from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from aggregator_service.checkpoints import Checkpoints
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
from model_store import LocalStore
from tests.brokers import AMQP_PORT, MQTT_PORT, amqp_url, mqtt_url, require
from tests.e2e.owned_brokers import owned_mosquitto
from tests.e2e.processes import (
    SEED,
    Api,
    deployment_env,
    max_difference,
    processes,
    rounds_when_done,
    start_worker,
    wait_checked_in,
    wait_healthy,
    wait_until,
)
from tests.ports import free_port

ROUNDS = 3


def test_a_tree_of_two_regions_on_their_own_brokers_commits_the_flat_model(
    tmp_path: Path,
) -> None:
    require(AMQP_PORT, "amqp")
    require(MQTT_PORT, "mqtt")
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["rounds"]["count"] = ROUNDS
    raw["training"]["epochs"] = 1
    expected = load(simulate(ExperimentConfig.from_dict(raw)).final_weights)
    namespace = f"tree{uuid.uuid4().hex[:8]}"
    workers = f"{namespace}-aggregators"
    port = free_port()
    env = deployment_env(tmp_path, amqp_url(), port, workers, FEDMQ_NAMESPACE=namespace)
    api = Api(env["FEDMQ_SERVER_URL"])
    with owned_mosquitto(tmp_path / "west-broker") as west, processes(tmp_path, env) as group:
        regions = {"east": mqtt_url(), "west": west.url}
        group.start("server", "server", "--port", str(port))
        wait_healthy(group, api)
        start_worker(group, "root-worker", f"{namespace}-root")
        for name, url in regions.items():
            group.start(f"bridge-{name}", "bridge", "--name", name, "--region", url)
            wait_until(
                lambda n=name: f"fedmq bridge {n}: " in group.log(f"bridge-{n}"), 60, name, group
            )
            start_worker(group, f"edge-{name}", f"{namespace}-{name}", "--broker", url)
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        for first, (name, url) in enumerate(regions.items()):
            group.start(
                f"fleet-{name}",
                *("fleet", "--devices", "10", "--first", str(10 * first)),
                *("--experiment", experiment_id, "--prefix", f"{name}{namespace[-4:]}"),
                *("--broker", url),
            )
        wait_checked_in(group, api, 20, " through the bridges")
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})
        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS), 240, f"{ROUNDS} rounds", group
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))

    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS, group.logs()
    assert all(len(set(r["accepted_updates"])) == r["accepted"] == 20 for r in rounds)
    # Each region's edge worker folded its own ten devices; the root folded none.
    checkpoints = Checkpoints(LocalStore(tmp_path / "store"))
    for number in range(1, ROUNDS + 1):
        edges = sorted(checkpoints.roster(experiment_id, number))
        assert edges == [f"{namespace}-east", f"{namespace}-west"], edges
        for edge in edges:
            share = checkpoints.latest(experiment_id, number, edge)
            assert share is not None and len(share.accepted_devices) == 10
            region = edge.rsplit("-", 1)[1]
            assert all(d.startswith(region) for d in share.accepted_devices)
    worst = max_difference(final, expected)
    assert worst <= 1e-6, f"the tree's and the flat simulation's models differ by {worst}"
