"""kill -9 of a worker, and of the service, mid-way through secure rounds (SecAgg+), over RabbitMQ.

Each test kills its process while round 2's devices are sending masked updates
(some are folded, the slow devices' are still to come), starts a replacement,
and checks that every round still commits and that the final model is
``fedmq simulate``'s with secure aggregation on (the same quantised updates,
summed and unmasked in another order: equal within float32 rounding).

- The worker: a second worker, under another name, takes the dead one's
  unacked masked updates; the dead one's checkpointed share of the masked sum
  is merged as it was saved, and the round unmasks as one sum.
- The service: the restarted coordinator rebuilds round 2's protocol state
  (keys, shares, the fixed sets) from the database, delivers the shares again,
  and drives the unmasking of the sum the worker sealed.
"""

from __future__ import annotations

import copy
import json
import signal
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from safetensors.numpy import load

from aggregator_service import Database, ExperimentConfig
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
from tests.brokers import AMQP_PORT, amqp_url, require
from tests.e2e.processes import (
    SEED,
    Api,
    Processes,
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
DEVICES = 6
SLOW = (3, 4, 5)
"""The devices that send their masked update ``SLOW_S`` after training, every round.

So round 2 has a moment when the other devices' masked updates are folded
and the slow ones' are still to come: the process dies then. The order the
updates arrive in changes nothing: masked sums add modulo 2^32 exactly.
"""
SLOW_S = 3.0
TOLERANCE = 1e-4
"""The largest weight difference allowed from ``simulate``: the sum of the quantised
updates is exact, their dequantised mean differs by float rounding at most."""


def _config() -> dict[str, Any]:
    """Return a small secure experiment every device of which trains in every round."""
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["data"]["devices"] = DEVICES
    raw["rounds"].update(
        count=ROUNDS,
        devices_per_round=DEVICES,
        over_selection=1.0,
        min_reports=DEVICES - 2,
        # Past its deadline a round closes without the devices still training, and
        # the model would differ from simulate's: long enough for a loaded machine.
        deadline_s=45.0,
    )
    # A stage that stalls (a device's answer lost) ends after 15 s without it,
    # which the comparison with simulate would catch.
    raw["secure_aggregation"] = {"stage_timeout_s": 15.0}
    return raw


def _start_fleet(group: Processes, api: Api, experiment_id: str, workdir: Path) -> None:
    """Start the experiment's fleet (``SLOW`` delayed); wait until every device checked in."""
    delays = workdir / "delays.json"
    delays.write_text(json.dumps({str(i): SLOW_S for i in SLOW}))
    group.start(
        "fleet",
        "fleet",
        "--devices",
        str(DEVICES),
        "--experiment",
        experiment_id,
        "--profile",
        str(delays),
        "--heartbeat",
        "1",
        "--prefix",
        f"sa{uuid.uuid4().hex[:4]}",
    )
    wait_checked_in(group, api, DEVICES)


def _progress(api: Api, experiment_id: str, number: int) -> dict[str, Any] | None:
    """Return what the coordinator knows of a round in training (None: not training)."""
    for r in api.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]:
        if r["round"] == number and r["state"] == "training":
            progress: dict[str, Any] | None = r.get("progress")
            return progress
    return None


def _fast_devices_folded(api: Api, experiment_id: str, number: int) -> bool:
    """Return whether round ``number`` is training with every fast device's update counted."""
    progress = _progress(api, experiment_id, number)
    return (
        progress is not None
        and progress["phase"] == "training"
        and progress["reported"] >= DEVICES - len(SLOW)
    )


def _checkpointed(store: Path, experiment_id: str, number: int, worker: str) -> bool:
    """Return whether ``worker`` has checkpointed part of round ``number``'s masked sum."""
    checkpoint = store / "models" / f"{experiment_id}.r{number}.{worker}.ckpt"
    return checkpoint.exists() and any(checkpoint.iterdir())


def _secure_stage(db_url: str, experiment_id: str, number: int) -> str | None:
    """Return the protocol stage the killed coordinator left in its database for a round."""
    db = Database(db_url)
    try:
        state = db.secagg_round(experiment_id, number)
    finally:
        db.close()
    return None if state is None else str(state["stage"])


def _simulated(raw: dict[str, Any]) -> Future[dict[str, Any]]:
    """Start ``fedmq simulate`` of the config (secure aggregation on) on a thread of its own.

    It runs while the deployment waits out its crash (a dead worker's silence,
    a restart), and the test is that much shorter.
    """
    pool = ThreadPoolExecutor(1, thread_name_prefix="simulate")
    future = pool.submit(lambda: load(simulate(ExperimentConfig.from_dict(raw)).final_weights))
    pool.shutdown(wait=False)
    return future


def _check_rounds(
    rounds: list[dict[str, Any]], final: dict[str, Any], expected: Future[dict[str, Any]]
) -> None:
    """Every round committed with every device once; the model is simulate's."""
    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS, rounds
    for record in rounds:
        assert record["accepted"] == DEVICES, record
        assert len(set(record["accepted_updates"])) == DEVICES  # each update counted once
    worst = max_difference(final, expected.result(timeout=120))
    assert worst <= TOLERANCE, f"the crash changed the model by {worst}"


def test_a_worker_killed_mid_secure_round_is_replaced_and_the_round_unmasks(
    tmp_path: Path,
) -> None:
    require(AMQP_PORT, "amqp")
    raw = _config()
    port = free_port()
    group = f"secagg-worker-{uuid.uuid4().hex[:8]}"
    env = deployment_env(tmp_path, amqp_url(), port, group)
    first_name, second_name = f"w1-{group}", f"w2-{group}"
    fast = str(DEVICES - len(SLOW))
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group_of:
        group_of.start("server", "-v", "server", "--port", str(port))
        wait_healthy(group_of, api)
        # Checkpointed (and acked) once the fast devices' masked updates are folded.
        first = group_of.start(
            "worker-1", "-v", "worker", "--name", first_name, "--checkpoint-every", fast
        )
        wait_until(lambda: "fedmq worker on" in group_of.log("worker-1"), 60, "worker 1", group_of)
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        _start_fleet(group_of, api, experiment_id, tmp_path)
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})

        # Round 2's fast devices' masked updates are in worker 1's checkpoint, and the
        # coordinator counted them (none is left for it to learn from the dead worker).
        wait_until(
            lambda: (
                _checkpointed(tmp_path / "store", experiment_id, 2, first_name)
                and _fast_devices_folded(api, experiment_id, 2)
            ),
            120,
            "round 2's fast devices folded and checkpointed",
            group_of,
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        del group_of.children["worker-1"]
        expected = _simulated(raw)
        # No worker is left to seal or commit: round 2 waits for the replacement.
        at_kill = _progress(api, experiment_id, 2)
        group_of.start(
            "worker-2", "-v", "worker", "--name", second_name, "--checkpoint-every", fast
        )

        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS),
            150,
            f"{ROUNDS} rounds after the crash",
            group_of,
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
        worker_1, worker_2 = group_of.log("worker-1"), group_of.log("worker-2")
        server = group_of.log("server")

    assert at_kill is not None and at_kill["reported"] < DEVICES, (
        f"worker 1 died outside round 2's masking: {at_kill}"
    )
    assert f"{experiment_id} round 2: masked sum" not in worker_1
    # Worker 2 sealed round 2's sum with worker 1's checkpointed share merged as saved,
    # and committed it once the coordinator had unmasked the whole sum.
    merges = [line for line in worker_2.splitlines() if f"{experiment_id} round 2: merged" in line]
    assert merges and all(repr(first_name) in line for line in merges), (
        f"worker 2 should have combined worker 1's share of round 2: {merges}"
    )
    assert f"{experiment_id} round 2: masked sum of {DEVICES} device(s) sealed" in worker_2
    assert f"{experiment_id} round 2: unmasking ready ({DEVICES} seeds, 0 pair seeds)" in server
    _check_rounds(rounds, final, expected)


def test_a_service_killed_mid_secure_round_recovers_the_protocol(tmp_path: Path) -> None:
    require(AMQP_PORT, "amqp")
    raw = _config()
    port = free_port()
    group = f"secagg-svc-{uuid.uuid4().hex[:8]}"
    env = deployment_env(
        tmp_path,
        amqp_url(),
        port,
        group,
        FEDMQ_SIGNING_KEY="a-signing-key-that-survives-restarts",
    )
    server_args = ("-v", "server", "--port", str(port))
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group_of:
        first = group_of.start("server-1", *server_args)
        wait_healthy(group_of, api)
        start_worker(group_of, "worker", f"w-{group}", "-v")
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        _start_fleet(group_of, api, experiment_id, tmp_path)
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})

        # Round 2's shares were delivered and its fast devices' masked updates folded;
        # the slow devices are still to send theirs, so the sum is not sealed.
        wait_until(
            lambda: _fast_devices_folded(api, experiment_id, 2),
            120,
            "round 2's fast devices folded",
            group_of,
        )
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        del group_of.children["server-1"]
        stage = _secure_stage(env["FEDMQ_DB_URL"], experiment_id, 2)
        expected = _simulated(raw)
        group_of.start("server-2", *server_args)
        wait_healthy(group_of, api)

        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS),
            150,
            f"{ROUNDS} rounds after the restart",
            group_of,
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
        before, after = group_of.log("server-1"), group_of.log("server-2")

    assert stage == "masking", f"the service died outside round 2's masking stage: {stage}"
    assert f"{experiment_id} round 2: unmasking ready" not in before
    coordinator = [line for line in after.splitlines() if "secagg.coordinator" in line]
    assert f"recovered secure round {experiment_id}/2 at stage masking" in after, (
        f"the restarted service should have rebuilt round 2 at its masking stage: {coordinator}"
    )
    assert f"{experiment_id} round 2: unmasking ready ({DEVICES} seeds, 0 pair seeds)" in after
    _check_rounds(rounds, final, expected)
