"""A worker stopped on purpose leaves its group: the next round is the remaining worker's whole.

Over MQTT a worker's session outlives its process, kept for a restart under
the same name. A stopped worker still subscribed to the group's updates
would go on receiving half of every round there, and the rounds would close
without them: two workers, one stopped, made every round wait out its
deadline and abandon with half its updates.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path

from fedmq.defaults import DEMO_CONFIG
from tests.brokers import MQTT_PORT, mqtt_url, require
from tests.e2e.processes import (
    SEED,
    Api,
    deployment_env,
    processes,
    rounds_when_done,
    start_fleet,
    start_workers,
    wait_healthy,
    wait_until,
)
from tests.ports import free_port

DEVICES = 10


def test_a_stopped_worker_takes_no_share_of_later_rounds(tmp_path: Path) -> None:
    require(MQTT_PORT, "Mosquitto")
    port = free_port()
    env = deployment_env(tmp_path, mqtt_url(), port, f"e2e-{uuid.uuid4().hex[:8]}")
    api = Api(env["FEDMQ_SERVER_URL"])
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["data"]["devices"] = DEVICES
    raw["rounds"] = {"devices_per_round": DEVICES, "min_reports": DEVICES, "deadline_s": 30.0}
    raw["training"]["epochs"] = 1
    with processes(tmp_path, env) as group:
        group.start("server", "server", "--port", str(port))
        wait_healthy(group, api)
        names = {f"worker-{n}": f"e2e-leaving-{uuid.uuid4().hex[:8]}" for n in (1, 2)}
        start_workers(group, names)
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        start_fleet(
            group, api, experiment_id, "--prefix", f"lv{uuid.uuid4().hex[:6]}", devices=DEVICES
        )
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": 1})
        wait_until(lambda: rounds_when_done(api, experiment_id, 1), 60, "round 1", group)

        leaving = group.children.pop("worker-2")  # its exit is what the test asks for
        leaving.terminate()
        assert leaving.wait(timeout=15) == 0, group.log("worker-2")
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": 1})
        rounds = wait_until(lambda: rounds_when_done(api, experiment_id, 2), 60, "round 2", group)

    first, second = rounds
    assert first["state"] == "committed" and first["accepted"] == DEVICES, first
    # Every update of round 2 reached the remaining worker: nothing waited in the
    # stopped worker's session, so the round did not wait for its deadline either.
    assert second["state"] == "committed", (second, group.logs())
    assert second["accepted"] == DEVICES, second
    assert second["ended_at"] - second["started_at"] < raw["rounds"]["deadline_s"], second
