"""Server, two or three workers and 20-device fleets as processes over RabbitMQ and Mosquitto.

The workers share the update queue, each folding its share of every round.
Each deployment runs four experiments side by side, one per strategy family
the issue names: fedavg, fedadam and scaffold commit, round by round, the
model ``fedmq simulate`` commits (one worker, in process); fedbuff's steps,
shared by the workers, count every update once. Every combination of broker
and worker count runs, with a seed other than the one a process falls back to.
"""

from __future__ import annotations

import copy
import functools
import uuid
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from aggregator_service.checkpoints import Checkpoints
from fedmq.compose import RunResult, simulate
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
    start_workers,
    wait_checked_in,
    wait_healthy,
    wait_until,
)
from tests.ports import free_port

ROUNDS = 3  # server state (FedAdam's moments, SCAFFOLD's controls) crosses two round ends
SIMULATED = {
    "fedavg": {"name": "fedavg"},
    "fedadam": {"name": "fedadam", "eta": 0.01},
    "scaffold": {"name": "scaffold", "num_clients": 20},
}
FEDBUFF = {"name": "fedbuff", "buffer_size": 5, "max_staleness": 4}
CELLS = [("amqp", 2), ("amqp", 3), ("mqtt", 2), ("mqtt", 3)]


def _config(strategy: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["name"] = strategy["name"]
    raw["seed"] = SEED
    raw["rounds"]["count"] = ROUNDS
    raw["training"]["epochs"] = 1
    raw["strategy"] = strategy
    if strategy["name"] == "fedbuff":
        raw["rounds"] = {"count": ROUNDS, "devices_per_round": 10, "over_selection": 1.0}
    return raw


@functools.cache
def _simulated(name: str) -> RunResult:
    """Return a strategy's in-process run, made once per test process."""
    return simulate(ExperimentConfig.from_dict(_config(SIMULATED[name])))


@pytest.mark.parametrize(("broker", "workers"), CELLS, ids=[f"{b}-{w}workers" for b, w in CELLS])
def test_workers_sharing_every_round_commit_what_one_would_and_count_each_update_once(
    broker: str, workers: int, tmp_path: Path
) -> None:
    require(AMQP_PORT if broker == "amqp" else MQTT_PORT, broker)
    url = amqp_url() if broker == "amqp" else mqtt_url()
    port = free_port()
    env = deployment_env(tmp_path, url, port, f"e2e-{uuid.uuid4().hex[:8]}")
    api = Api(env["FEDMQ_SERVER_URL"])
    strategies = {**SIMULATED, "fedbuff": FEDBUFF}
    with processes(tmp_path, env) as group:
        group.start("server", "server", "--port", str(port))
        wait_healthy(group, api)
        names = (f"e2e-worker-{uuid.uuid4().hex[:8]}" for _ in range(workers))
        start_workers(group, {f"worker-{n}": name for n, name in enumerate(names, start=1)})
        ids = {
            name: api.call("POST", "/experiments", _config(strategy))["id"]
            for name, strategy in strategies.items()
        }
        # The four fleets start at once: each takes seconds to load its data and enroll.
        for name, experiment_id in ids.items():
            flags = ["--profile", "heterogeneous"] if name == "fedbuff" else []
            prefix = f"{name}{uuid.uuid4().hex[:6]}"
            group.start(
                f"fleet-{name}",
                "fleet",
                "--devices",
                "20",
                "--experiment",
                experiment_id,
                "--prefix",
                prefix,
                *flags,
            )
        wait_checked_in(group, api, 20 * len(ids))
        for experiment_id in ids.values():
            api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})
        rounds = {
            name: wait_until(
                lambda: rounds_when_done(api, experiment_id, ROUNDS),  # noqa: B023 (called here)
                240,
                f"{name}'s {ROUNDS} rounds",
                group,
            )
            for name, experiment_id in ids.items()
        }
        finals = {
            name: load(api.call("GET", f"/experiments/{experiment_id}/model"))
            for name, experiment_id in ids.items()
        }
        fedbuff = api.call("GET", f"/experiments/{ids['fedbuff']}")
        checkpoints = Checkpoints(LocalStore(tmp_path / "store"))
        saved = {
            name: [_saved_shares(checkpoints, experiment_id, n) for n in range(1, ROUNDS + 1)]
            for name, experiment_id in ids.items()
        }

    for name in strategies:
        # Each round committed what its workers' saved shares hold, nothing more or less:
        # a share left out (or taken twice) shows here.
        for record, (roster, held) in zip(rounds[name], saved[name], strict=True):
            assert record["state"] == "committed", (name, record, group.logs())
            committed = record["accepted_updates"]
            assert len(committed) == len(set(committed)) == record["accepted"], (name, record)
            assert set(committed) == held, (name, record["round"], roster)
        # Every worker took a share of some round (a step of five updates may go to two).
        least = 2 if name == "fedbuff" else workers
        assert max(len(roster) for roster, _ in saved[name]) >= least, (name, saved[name])
    for name in SIMULATED:
        in_process = _simulated(name)
        assert all(r["accepted"] == 20 for r in rounds[name])
        expected = load(in_process.final_weights)
        worst = max_difference(finals[name], expected)
        assert worst <= 1e-6, f"{name}: distributed and simulated models differ by {worst}"
        accuracy = in_process.final_metrics["accuracy"]
        assert rounds[name][-1]["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-3)
    steps = rounds["fedbuff"]
    assert [(r["base_version"], r["version"]) for r in steps] == [(n, n + 1) for n in range(ROUNDS)]
    # Shares fold until they hear of the close, so a step may hold a few more than K.
    assert all(r["accepted"] >= 5 for r in steps)
    updates = [u for r in steps for u in r["accepted_updates"]]
    assert len(updates) == len(set(updates))  # each update folded into exactly one version
    assert fedbuff["model_version"] == ROUNDS
    # 10 tasks went out at once, and devices got new ones as they finished.
    assert len(steps[0]["selected_devices"]) >= 10
    assert "fedmq fleet: speed profile heterogeneous: " in group.log("fleet-fedbuff")


def _saved_shares(
    checkpoints: Checkpoints, experiment_id: str, number: int
) -> tuple[list[str], set[str]]:
    """Return a round's roster and the updates its members' newest checkpoints hold."""
    roster = checkpoints.roster(experiment_id, number)
    held: set[str] = set()
    for worker in roster:
        latest = checkpoints.latest(experiment_id, number, worker)
        if latest is not None:
            held |= {*latest.accepted, *latest.aside}
    return roster, held
