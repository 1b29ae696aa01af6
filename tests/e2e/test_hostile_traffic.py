"""Over 10,000 hostile frames against a real deployment: nothing crashes, nothing changes the model.

Server, worker and a 20-device fleet run as processes over a private
Mosquitto (the shipped limits, anonymous clients allowed: the worst case,
where the broker lets anyone in) and over the shared RabbitMQ in a namespace
of the test's own. An attacker with no FedMQ key captures what it can read
and publishes garbage, truncated, malformed, deeply nested and oversized
frames, unsigned and spoofed updates, NaN weights, replays, forged round
control, outcomes and tasks, ghost check-ins and check-outs, and a flood of
large updates for an experiment nobody runs, while rounds train. Every round
must commit, the final model must equal the clean in-process run's, no
process may log a traceback, the refusals must be counted by reason on
``/metrics``, and memory must stay bounded.
"""

from __future__ import annotations

import copy
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from broker import connect
from broker.topics import Topics
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
from tests.brokers import AMQP_PORT, amqp_url, require
from tests.e2e.hostile import Attacker, metrics, rss_mb
from tests.e2e.owned_brokers import OwnedMosquitto, owned_mosquitto
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

ROUNDS = 4
PASSES = 360  # about 30 frames a pass


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["rounds"]["count"] = ROUNDS
    return raw


@pytest.fixture(scope="module")
def clean(config: dict[str, Any]) -> Any:
    return simulate(ExperimentConfig.from_dict(config))


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[OwnedMosquitto]:
    with owned_mosquitto(tmp_path / "mosquitto") as broker:
        yield broker


@pytest.mark.parametrize("broker", ["mqtt", "amqp"])
def test_hostile_traffic_changes_nothing(
    broker: str, tmp_path: Path, request: pytest.FixtureRequest, config: Any, clean: Any
) -> None:
    if broker == "amqp":
        require(AMQP_PORT, "amqp")
        url, broker_pid = amqp_url(), None
    else:
        owned: OwnedMosquitto = request.getfixturevalue("mosquitto")
        url, broker_pid = owned.url, owned.pid
    namespace = f"hostile{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = deployment_env(tmp_path, url, port, f"{namespace}-aggregators", FEDMQ_NAMESPACE=namespace)
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group:
        start_service_and_worker(group, api, port, f"{namespace}-worker")
        experiment_id = api.call("POST", "/experiments", config)["id"]
        attacker = Attacker(connect(url), Topics(namespace), experiment_id)
        attacker.listen()
        start_fleet(group, api, experiment_id, "--prefix", namespace)
        pids = {n: group.children[n].pid for n in ("server", "worker")}
        if broker_pid is not None:
            pids["broker"] = broker_pid
        before = {name: rss_mb(pid) for name, pid in pids.items()}

        # Prepare / Execute: rounds train while the barrage runs.
        def attack() -> None:
            attacker.barrage(PASSES, pause=lambda: time.sleep(0.004))
            attacker.oversized(10)
            attacker.flood(200, 200_000)

        barrage = threading.Thread(target=attack, name="attacker")
        barrage.start()
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS - 1})
        barrage.join(timeout=300)
        wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS - 1), 240, "the rounds", group
        )
        # One more round, after the barrage: its outcome carries the worker's final counts.
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": 1})
        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS), 240, "the last round", group
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
        counted = metrics(_get(f"http://127.0.0.1:{port}/metrics"))
        after = {name: rss_mb(pid) for name, pid in pids.items()}
        logs = {name: group.log(name) for name in ("server", "worker", "fleet")}

    # Assert
    sent = sum(attacker.sent.values())
    print(f"\n{broker}: hostile frames sent by kind: {dict(sorted(attacker.sent.items()))}")
    print(f"{broker}: refusals by (component, reason): {dict(sorted(counted.items()))}")
    print(f"{broker}: RSS MB before {before} after {after}")
    assert not barrage.is_alive()
    assert sent >= 10_000
    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS, group.logs()
    assert all(r["accepted"] == 20 for r in rounds), [
        (r["accepted"], r["rejected"], r["dropped"]) for r in rounds
    ]
    worst = max_difference(final, load(clean.final_weights))
    assert worst <= 1e-6, f"the attacked run's model differs from the clean run's by {worst}"
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-3000:]}"
    refused = {reason for (_, reason), n in counted.items() if n}
    for reason in ("malformed", "unsigned", "bad_signature", "unknown_sender", "bad_grant"):
        assert reason in refused, f"no {reason!r} refusal counted: {counted}"
    worker_refused = sum(n for (c, _), n in counted.items() if c != "coordinator")
    coordinator_refused = sum(n for (c, _), n in counted.items() if c == "coordinator")
    assert worker_refused >= attacker.sent["flood"] and coordinator_refused >= 1_000
    for name in pids:  # the flood is 40 MB: none keeps it, nor much of the barrage
        limit = 100 if name == "broker" else 300  # the service loads torch as it evaluates
        assert after[name] - before[name] < limit, (
            f"{name} grew from {before[name]} to {after[name]} MB"
        )


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())
