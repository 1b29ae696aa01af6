"""kill -9 of one of two aggregator workers mid-round: nothing lost, nothing twice.

Both workers share the experiment's updates. The one to die reaches the broker
through a proxy that, once the worker has saved a checkpoint of round 2, drops
its acks: the updates of its next checkpoint are then folded and saved but
still the broker's, as when a worker dies between its checkpoint and its acks.
It is killed, and they come back along with the ones it had not saved yet.
Over RabbitMQ they go to the surviving worker, which combines the dead one's
saved share as it was saved; over Mosquitto they stay in the dead worker's
session, so it is restarted under its name and resumes its share.
"""

from __future__ import annotations

import copy
import json
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from aggregator_service.checkpoints import Checkpoints
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
    wait_healthy,
    wait_until,
)
from tests.ports import free_port
from tests.tcp_proxy import TcpProxy

ROUNDS = 3


@pytest.mark.parametrize("broker", ["amqp", "mqtt"])
def test_one_of_two_workers_killed_mid_round_loses_nothing_and_counts_nothing_twice(
    tmp_path: Path, broker: str
) -> None:
    broker_port = AMQP_PORT if broker == "amqp" else MQTT_PORT
    require(broker_port, broker)
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["rounds"]["count"] = ROUNDS
    # Round 2 must still be open when the worker dies: device i sends its update
    # 0.4 * i s after its training, so a round's updates arrive over 8 s.
    # Waited, not trained: the fleet and the simulation stay at the demo's 5 epochs.
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({str(i): 0.4 * i for i in range(20)}))
    port = free_port()
    group = f"crash-{uuid.uuid4().hex[:8]}"
    url = amqp_url() if broker == "amqp" else mqtt_url()
    env = deployment_env(tmp_path, url, port, group)
    doomed, survivor = f"w1-{group}", f"w2-{group}"
    proxy = TcpProxy(broker_port, protocol=broker)
    through_proxy = amqp_url(proxy.port) if broker == "amqp" else mqtt_url(proxy.port)
    checkpoints = Checkpoints(LocalStore(tmp_path / "store"))
    api = Api(env["FEDMQ_SERVER_URL"])

    def saved(experiment_id: str) -> set[str]:
        latest = checkpoints.latest(experiment_id, 2, doomed)
        return set() if latest is None else set(latest.accepted)

    try:
        with processes(tmp_path, env) as group_of:
            group_of.start("server", "server", "--port", str(port))
            wait_healthy(group_of, api)
            # A checkpoint every 2 folds (one every 1.6 s or so for each worker): the
            # second after the acks stop comes early in round 2's 8 s, well before its end.
            flags = ("--checkpoint-every", "2")
            first = group_of.start(
                "worker-1", "worker", "--name", doomed, "--broker", through_proxy, *flags
            )
            group_of.start("worker-2", "-v", "worker", "--name", survivor, *flags)
            wait_until(
                lambda: all("fedmq worker on" in group_of.log(f"worker-{i}") for i in (1, 2)),
                60,
                "both workers",
                group_of,
            )
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

            wait_until(lambda: saved(experiment_id), 120, "worker 1's checkpoint", group_of)
            proxy.withhold_acks()
            acked = saved(experiment_id)  # a later checkpoint's acks are all withheld
            wait_until(lambda: saved(experiment_id) > acked, 60, "a checkpoint not acked", group_of)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            del group_of.children["worker-1"]
            unacked = saved(experiment_id) - acked
            during = api.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
            proxy.cut()  # the broker takes back every delivery worker 1 had not acked
            resumer = "worker-2"
            if broker == "mqtt":
                resumer = "worker-1-again"
                group_of.start(resumer, "-v", "worker", "--name", doomed, *flags)

            rounds = wait_until(
                lambda: rounds_when_done(api, experiment_id, ROUNDS),
                240,
                f"{ROUNDS} rounds after the crash",
                group_of,
            )
            final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
            log = group_of.log(resumer)
            roster = checkpoints.roster(experiment_id, 2)
    finally:
        proxy.close()

    assert proxy.withheld > 0
    assert [r["state"] for r in during if r["round"] == 2] == ["training"], during
    assert set(roster) >= {doomed, survivor}, roster  # both folded part of round 2
    # Saved by the dead worker, given again by the broker, and dropped as counted.
    copies = re.compile(rf"{experiment_id} round 2: update (\S+) from \S+ is already counted in")
    dropped = set(copies.findall(log))
    assert unacked and unacked <= dropped, (unacked, dropped)
    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS
    for record in rounds:
        assert record["accepted"] == 20
        assert len(set(record["accepted_updates"])) == 20  # each update counted once
        # No round waited out its deadline: devices the dead worker saved but did not
        # live to report are read from its saved share once the round goes quiet.
        assert record["ended_at"] < record["deadline_at"], record
    if broker == "amqp":
        merges = [line for line in log.splitlines() if f"{experiment_id} round 2: merged" in line]
        assert merges and all(repr(doomed) in line for line in merges), (
            f"worker 2 should have combined worker 1's share of round 2 as saved: {merges}"
        )
    else:
        assert f"resumed {experiment_id} round 2 from checkpoint" in log
    expected = load(simulate(ExperimentConfig.from_dict(raw)).final_weights)
    worst = max_difference(final, expected)
    assert worst <= 1e-6, f"the crash changed the model by {worst}"
