"""kill -9 of an aggregator worker mid-round: nothing lost, nothing twice.

Over RabbitMQ a second worker, under another name, takes the dead one's unacked
updates; the dead one's checkpointed share is combined as it was saved. Over
Mosquitto a dead worker's unacked updates stay in its session, so it is
restarted under its name and resumes its share.
"""

from __future__ import annotations

import copy
import json
import signal
import uuid
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
    wait_until,
)
from tests.ports import free_port

ROUNDS = 3


@pytest.mark.parametrize("broker", ["amqp", "mqtt"])
def test_a_worker_killed_mid_round_is_replaced_without_losing_or_doubling_updates(
    tmp_path: Path, broker: str
) -> None:
    require(AMQP_PORT if broker == "amqp" else MQTT_PORT, broker)
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["rounds"]["count"] = ROUNDS
    # Round 2 must still be open when the worker dies: device i sends its update
    # 0.4 * i s after its training, so a round's updates arrive over 8 s and about
    # 15 are still to come at the first checkpoint (every 5). Waited, not trained:
    # the fleet and the simulation below stay at the demo's 5 epochs.
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({str(i): 0.4 * i for i in range(20)}))
    port = free_port()
    group = f"crash-{uuid.uuid4().hex[:8]}"
    url = amqp_url() if broker == "amqp" else mqtt_url()
    env = deployment_env(tmp_path, url, port, group)
    # AMQP hands a dead worker's unacked updates to any worker of the group; MQTT
    # keeps them in the dead worker's session, which a restart under its name resumes.
    names = (f"w1-{group}", f"w2-{group}") if broker == "amqp" else (f"w-{group}",) * 2
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group_of:
        group_of.start("server", "server", "--port", str(port))
        api.wait_healthy()  # the server has written the service key the worker pins
        first = group_of.start("worker-1", "worker", "--name", names[0], "--checkpoint-every", "5")
        wait_until(lambda: "fedmq worker on" in group_of.log("worker-1"), 60, "worker 1", group_of)
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        start_fleet(
            group_of,
            api,
            experiment_id,
            "--profile",
            str(trace),
            "--prefix",
            f"crash{uuid.uuid4().hex[:4]}",
        )
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})

        checkpoint = tmp_path / "store" / "models" / f"{experiment_id}.r2.{names[0]}.ckpt"
        wait_until(
            lambda: checkpoint.exists() and any(checkpoint.iterdir()),
            120,
            "round 2's first checkpoint",
            group_of,
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        del group_of.children["worker-1"]
        group_of.start("worker-2", "-v", "worker", "--name", names[1], "--checkpoint-every", "5")

        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS),
            240,
            f"{ROUNDS} rounds after the crash",
            group_of,
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
        resumed = f"resumed {experiment_id} round 2 from checkpoint" in group_of.log("worker-2")
        merges = [
            line
            for line in group_of.log("worker-2").splitlines()
            if f"{experiment_id} round 2: merged" in line
        ]

    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS
    for record in rounds:
        assert record["accepted"] == 20
        assert len(set(record["accepted_updates"])) == 20  # each update counted once
        # No round waited out its deadline: devices the dead worker saved but did not
        # live to report are read from its saved share once the round goes quiet.
        assert record["ended_at"] < record["deadline_at"], record
    if broker == "amqp":
        # Worker 1 died after checkpointing part of round 2: that share must be merged
        # as saved (worker 2 also holds a share unless worker 1 had folded them all).
        # (A repeated combine request logs the same merge again.)
        assert merges and all(repr(names[0]) in line for line in merges), (
            f"worker 2 should have combined worker 1's share of round 2: {merges}"
        )
    else:
        # The restarted worker resumes its chain when round 2's unacked updates come
        # back from its session; had worker 1 folded (and acked) them all before the
        # kill, none come back and the restarted worker combines the chain as saved.
        assert resumed or merges, "the restarted worker should have used its share of round 2"
    expected = load(simulate(ExperimentConfig.from_dict(raw)).final_weights)
    worst = max_difference(final, expected)
    assert worst <= 1e-6, f"the crash changed the model by {worst}"
