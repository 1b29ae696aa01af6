"""A 3-node RabbitMQ cluster loses the node leading the workers' update queue mid-round.

The cluster is the module's own (``OwnedRabbitCluster``: private nodes on
loopback ports). Every process names all three nodes in its broker URL and
declares quorum queues (``queue_type=quorum``): the server and the workers start
at node 1, so the update queue, which the workers declare, is led from there;
the fleet starts at node 3. Devices report one after another, 0.3 s apart. In
round 2 (or 3), once the workers hold updates they have not acked and more are
to come, node 1 is killed with SIGKILL. The server and the workers fail over
to node 2; the queue elects a new leader among the survivors and hands back
the updates the dead connections held. The fleet keeps its connection, and its
queues, led from node 3, never move.

Two workers share the update queue. Each survives losing its connection and
still holds, in its share, updates it folded and had not acked; RabbitMQ hands
them back to the queue, and either worker may get them, redelivered. A worker
recognises its own; one the other may hold unsaved is set aside, and the
combiner merges it only if no saved share counted it. Every round commits with
every update counted once, and the model equals ``fedmq simulate``'s. Node 1,
started again, rejoins the cluster (which also spares the processes' clean stop
the ~5 s a quorum queue's deletion waits for a member that is down).
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from aggregator_service.checkpoints import Checkpoints
from broker.amqp import GROUP_PREFIX
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
from model_store import LocalStore
from tests.e2e.owned_brokers import OwnedRabbitCluster, OwnedRabbitMQ, owned_rabbitmq_cluster
from tests.e2e.processes import (
    Api,
    Processes,
    deployment_env,
    max_difference,
    processes,
    rounds_when_done,
    start_fleet,
    start_worker,
    wait_healthy,
    wait_until,
)
from tests.ports import free_port

ROUNDS = 3
WORKERS = ("worker-1", "worker-2")
PACE_S = 0.3
"""Device ``i`` sends its update ``i * PACE_S`` seconds after training (``--profile``).

The devices' own delays, not their training, spread a round's 20 updates over
6 s whatever the machine's load, so the node dies while some are folded and
unacked and others are still to come.
"""
QUORUM = "?queue_type=quorum"
# Past a round's 20 updates: a worker acks a round's updates only when it closes
# the round, so every update it has folded when the node dies comes back.
CHECKPOINT_EVERY = "100"
UNACKED = range(3, 11)
"""Updates the workers hold unacked when the node dies: some, and at least 10 still to come."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnedRabbitCluster]:
    with owned_rabbitmq_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


def test_killing_the_node_leading_the_update_queue_mid_round_loses_and_doubles_nothing(
    tmp_path: Path, cluster: OwnedRabbitCluster
) -> None:
    raw = _config()
    first, second, third = cluster.nodes
    group = f"cluster-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = deployment_env(tmp_path, cluster.url_from(first) + QUORUM, port, group)
    api = Api(env["FEDMQ_SERVER_URL"])
    with ThreadPoolExecutor(1) as pool, processes(tmp_path, env) as group_of:
        # Simulated meanwhile: the distributed run mostly waits on the devices' pace.
        simulated = pool.submit(simulate, ExperimentConfig.from_dict(raw))
        experiment_id = _deploy(group_of, api, port, group, raw, fleet_url=cluster.url_from(third))
        queue = cluster.queue(GROUP_PREFIX + group)
        leader = cluster.leader(GROUP_PREFIX + group)
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})

        killed_in, unacked = _wait_for_unacked_updates(
            api, experiment_id, cluster, GROUP_PREFIX + group, group_of
        )
        down = time.monotonic()
        leader.stop(graceful=False)
        during = api.round_states(experiment_id)
        new_leader = wait_until(
            lambda: _leader_other_than(cluster, GROUP_PREFIX + group, leader),
            30,
            "a new leader of the update queue",
            group_of,
        )
        failover_s = time.monotonic() - down

        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS),
            180,
            f"{ROUNDS} rounds after the node was killed",
            group_of,
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
        moved = {n: _moved_off(group_of.log(n), leader) for n in ("server", *WORKERS)}
        roster = Checkpoints(LocalStore(tmp_path / "store")).roster(experiment_id, killed_in)
        fleet_cut_off = "reconnecting" in group_of.log("fleet")
        leader.start()
        rejoined = cluster.running_nodes(leader)

    assert queue["type"] == "quorum", queue
    assert leader is first, f"the update queue was led by {leader.node}, not the first node"
    assert new_leader in (second, third)
    assert during[killed_in] == "training", f"round {killed_in} ({unacked=}) ended: {during}"
    assert all(moved.values()), f"not every process on the dead node failed over: {moved}"
    assert not fleet_cut_off, "the fleet, connected to node 3, lost its connection"
    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS, rounds
    for record in rounds:
        # Each accepted update listed once, and every device's update accepted.
        assert record["accepted"] == 20, record
        assert len(record["accepted_updates"]) == len(set(record["accepted_updates"])) == 20
    assert rejoined == {node.node for node in cluster.nodes}, rejoined
    assert len(roster) == len(WORKERS), f"round {killed_in} was not shared: {roster}"
    expected = load(simulated.result(timeout=120).final_weights)
    worst = max_difference(final, expected)
    assert worst <= 1e-6, (
        f"losing a node ({failover_s:.1f} s to a new leader) changed the model by {worst}"
    )


def _deploy(
    group_of: Processes, api: Api, port: int, group: str, raw: dict[str, Any], *, fleet_url: str
) -> str:
    """Start the server, the workers and the paced fleet; return the experiment's id.

    The server and the workers connect with the deployment's URL (node 1 first);
    the workers declare the update queue, so its leader is node 1.
    """
    group_of.start("server", "-v", "server", "--port", str(port))
    wait_healthy(group_of, api)
    for name in WORKERS:
        start_worker(
            group_of, name, f"{name}-{group}", "-v", "--checkpoint-every", CHECKPOINT_EVERY
        )
    experiment_id: str = api.call("POST", "/experiments", raw)["id"]
    pace = _pace(group_of.workdir / "pace.json")
    flags = ("--profile", str(pace), "--prefix", group, "--broker", fleet_url + QUORUM)
    start_fleet(group_of, api, experiment_id, *flags)
    return experiment_id


def _config() -> dict[str, Any]:
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = 7
    raw["rounds"]["count"] = ROUNDS
    return raw


def _pace(path: Path) -> Path:
    """Write the fleet's speed trace: device ``i`` waits ``i * PACE_S`` before reporting."""
    path.write_text(json.dumps({str(i): i * PACE_S for i in range(20)}))
    return path


def _wait_for_unacked_updates(
    api: Api, experiment_id: str, cluster: OwnedRabbitCluster, queue: str, group_of: Processes
) -> tuple[int, int]:
    """Wait until a round from the second on runs and the workers hold updates unacked.

    Return the round and how many it holds. The count comes from RabbitMQ's
    queue statistics, up to half a second old (``quorum_tick_interval``).
    """

    def open_round() -> tuple[int, int] | None:
        training = [
            n for n, state in api.round_states(experiment_id).items() if state == "training"
        ]
        if not training or training[0] < 2:
            return None
        held = int(cluster.queue(queue)["messages_unacknowledged"] or 0)
        return (training[0], held) if held in UNACKED else None

    found: tuple[int, int] = wait_until(open_round, 120, "updates held unacked", group_of)
    return found


def _leader_other_than(
    cluster: OwnedRabbitCluster, queue: str, dead: OwnedRabbitMQ
) -> OwnedRabbitMQ | None:
    try:
        leader = cluster.leader(queue)
    except RuntimeError:
        return None  # no leader elected yet
    return leader if leader is not dead else None


def _moved_off(log: str, dead: OwnedRabbitMQ) -> bool:
    """Return whether a process's log shows it reconnected to a node other than ``dead``."""
    return any(
        "reconnected to" in line and f":{dead.port})" not in line for line in log.splitlines()
    )
