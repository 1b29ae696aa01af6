"""`fedmq submit --watch`, `ls`, `status`, `model pull` and `stop` against a live service.

Server, worker and fleet are processes on Mosquitto in a namespace of their
own; the commands are run as a user would, with the deployment's environment.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

from safetensors.numpy import load, load_file

from fedmq.defaults import DEMO_CONFIG
from tests.brokers import MQTT_PORT, mqtt_url, require
from tests.e2e.processes import (
    Api,
    Processes,
    deployment_env,
    max_difference,
    processes,
    start_service_and_worker,
    wait_until,
)
from tests.ports import free_port


def _fedmq(group: Processes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedmq", *args],
        env=group.env,
        cwd=group.workdir,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def test_submit_watch_then_list_inspect_pull_and_stop_a_run(tmp_path: Path) -> None:
    require(MQTT_PORT, "mqtt")
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = 3
    raw["training"]["epochs"] = 1
    config = tmp_path / "config.json"
    config.write_text(json.dumps(raw))
    namespace = f"runs{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = deployment_env(
        tmp_path, mqtt_url(), port, f"{namespace}-aggregators", FEDMQ_NAMESPACE=namespace
    )
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group:
        start_service_and_worker(group, api, port, f"{namespace}-worker")
        watch_log = (tmp_path / "submit.log").open("w")
        watching = subprocess.Popen(
            [sys.executable, "-m", "fedmq", "submit", str(config), "--rounds", "2", "--watch"],
            env=group.env,
            cwd=tmp_path,
            stdout=watch_log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        submitted = wait_until(
            lambda: re.search(
                r"^submitted (\S+): 2 round\(s\)$", (tmp_path / "submit.log").read_text(), re.M
            ),
            60,
            "submit",
            group,
        )
        experiment_id = submitted[1]
        # Its rounds wait for devices: the fleet comes now. Device 0 takes 2 s more
        # than the others, so each round trains for 2 s: a stop lands in training.
        trace = tmp_path / "trace.json"
        trace.write_text(json.dumps({"0": 2.0}))
        group.start(
            "fleet",
            "fleet",
            "--devices",
            "20",
            "--experiment",
            experiment_id,
            "--profile",
            str(trace),
        )
        assert watching.wait(timeout=240) == 0, (tmp_path / "submit.log").read_text()
        watched = (tmp_path / "submit.log").read_text().splitlines()

        listed = _fedmq(group, "ls", "--json")
        status = _fedmq(group, "status", experiment_id)
        pulled = _fedmq(group, "model", "pull", experiment_id, "--out", "final.safetensors")
        served = load(api.call("GET", f"/experiments/{experiment_id}/model"))

        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": 50})
        wait_until(
            lambda: api.call("GET", f"/experiments/{experiment_id}")["current_round"] >= 3,
            60,
            "round 3 to start",
            group,
        )
        stopped = _fedmq(group, "stop", experiment_id)
        after = wait_until(
            lambda: _ended(api, experiment_id), 60, "the stopped experiment to settle", group
        )

    assert [line.split()[:2] for line in watched[2:]] == [["1", "committed"], ["2", "committed"]]
    assert listed.returncode == 0 and experiment_id in {
        e["id"] for e in json.loads(listed.stdout)["experiments"]
    }
    assert status.returncode == 0 and "idle, round 2 of 2, model v2" in status.stdout
    assert pulled.returncode == 0, pulled.stderr
    assert max_difference(load_file(tmp_path / "final.safetensors"), served) == 0.0
    assert stopped.returncode == 0, stopped.stderr
    experiment, rounds = after
    assert len(rounds) < 50 and experiment["current_round"] == len(rounds)
    assert rounds[-1]["state"] == "abandoned"
    assert rounds[-1]["reason"] == "stopped by the operator"


def _ended(api: Api, experiment_id: str) -> tuple[dict, list] | None:  # type: ignore[type-arg]
    experiment = api.call("GET", f"/experiments/{experiment_id}")
    rounds = api.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
    if any(r["state"] == "training" for r in rounds) or experiment["state"] != "idle":
        return None
    return experiment, rounds
