"""Python edge devices training on files of their own (`fedmq devices run`), beside a fleet.

Two edge devices hold, as ``.npz`` files, the examples the fleet would give
devices 0 and 1; an emulated fleet runs the other 18. Given the fleet's seed
and their indices as batch-order streams, the deployment commits the model
``fedmq simulate`` does. An edge device whose file does not fit the
experiment's model is refused before it enrolls, and a second server on the
port in use stops before it touches the running one's rounds.
"""

from __future__ import annotations

import copy
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from device_sdk.data import load_dataset, partition
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
from tests.brokers import MQTT_PORT, mqtt_url, require
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
EDGE = (0, 1)


def _config() -> dict[str, Any]:
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["rounds"]["count"] = ROUNDS
    raw["training"]["epochs"] = 1
    return raw


def _edge_files(tmp_path: Path, raw: dict[str, Any]) -> dict[int, Path]:
    """Write the examples the fleet would give each edge device to a file of its own."""
    data = raw["data"]
    dataset = load_dataset(data["dataset"])
    parts = partition(
        dataset.y_train, data["devices"], data["partition"], seed=SEED, alpha=data["alpha"]
    )
    files = {}
    for index in EDGE:
        files[index] = tmp_path / f"edge-{index}.npz"
        np.savez(files[index], x=dataset.x_train[parts[index]], y=dataset.y_train[parts[index]])
    return files


def test_edge_devices_on_their_own_files_commit_what_the_simulation_does(tmp_path: Path) -> None:
    require(MQTT_PORT, "mqtt")
    raw = _config()
    files = _edge_files(tmp_path, raw)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((5, 8, 9), np.float32), y=np.zeros(5, np.int64))
    port = free_port()
    env = deployment_env(tmp_path, mqtt_url(), port, f"edge-{uuid.uuid4().hex[:8]}")
    api = Api(env["FEDMQ_SERVER_URL"])
    tag = uuid.uuid4().hex[:6]
    with processes(tmp_path, env) as group:
        start_service_and_worker(group, api, port, f"edge-worker-{tag}")
        experiment_id = api.call("POST", "/experiments", raw)["id"]

        def run_device(process: str, index: int, data: Path) -> None:
            key = tmp_path / f"{process}.key"
            group.start(
                *(process, "devices", "run", "--device-id", f"edge{index}-{tag}"),
                *("--key-file", str(key), "--data", str(data), "--experiment", experiment_id),
                *("--seed", str(SEED), "--stream", str(index)),
            )

        run_device("misfit", 9, wrong)
        misfit = group.children.pop("misfit")
        misfit.wait(timeout=60)
        for index, data in files.items():
            run_device(f"edge-{index}", index, data)
        start_fleet(
            group,
            api,
            experiment_id,
            *("--devices", "18", "--first", "2", "--prefix", f"emu{tag}"),
            online=20,
        )
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})
        # A second server on the port in use stops before it touches the running
        # one's rounds (recovering them would resend their tasks).
        group.start("second-server", "-v", "server", "--port", str(port))
        second = group.children.pop("second-server")
        second.wait(timeout=60)
        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS), 180, "the rounds", group
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
        enrolled = {d["id"] for d in api.call("GET", "/devices")["devices"]}

    assert misfit.returncode == 1
    assert second.returncode == 1
    refused = group.log("second-server")
    assert f"fedmq: cannot listen on 127.0.0.1:{port}: Address already in use" in refused
    assert "recovered" not in refused and "Traceback" not in refused, refused
    assert "model takes examples shaped [64]; the data file's are [8, 9]" in group.log("misfit")
    assert f"edge9-{tag}" not in enrolled  # refused before it enrolled
    edge_ids = {f"edge{index}-{tag}" for index in EDGE}
    for record in rounds:
        assert record["state"] == "committed" and record["accepted"] == 20, record
        assert edge_ids <= set(record["selected_devices"]), record  # and all 20 accepted
    for index in EDGE:
        log = group.log(f"edge-{index}")
        examples = len(np.load(files[index])["y"])
        assert f"fedmq device edge{index}-{tag}: {examples} examples on mqtt://" in log
        assert f"fedmq device stopped: {{'tasks': {ROUNDS}, 'updates_sent': {ROUNDS}" in log, log
    expected = load(simulate(ExperimentConfig.from_dict(raw)).final_weights)
    worst = max_difference(final, expected)
    assert worst <= 1e-6, f"edge devices and simulation differ by {worst}"
