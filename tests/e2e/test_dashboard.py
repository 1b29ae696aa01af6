"""The dashboard in a real browser, against a live ``fedmq server`` with a worker and a fleet.

Headless Chromium (Debian's, through selenium) signs in with the admin
token and drives the page as an operator would; every figure it checks is
the page's, and the API is asked only to confirm what the page said. Each
deployment has a namespace of its own on the shared Mosquitto. Screenshots:
the test's folder and ``runs/screenshots/``.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedmq.defaults import DEMO_CONFIG
from tests.brokers import MQTT_PORT, mqtt_url, require
from tests.e2e.browser import (
    Screenshots,
    attribute,
    chromium,
    click,
    console_errors,
    fill,
    sign_in,
    text,
)
from tests.e2e.processes import (
    TOKEN,
    Api,
    Processes,
    deployment_env,
    processes,
    start_service_and_worker,
    wait_until,
)
from tests.ports import free_port


def _config(name: str, **rounds: Any) -> dict[str, Any]:
    """Return the demo config, small and quick: one epoch, the round settings given."""
    raw = copy.deepcopy(DEMO_CONFIG)
    raw["name"] = name
    raw["training"]["epochs"] = 1
    raw["rounds"].update(rounds)
    return raw


class Deployment:
    """A server, a worker, fleets, and a browser on the server's dashboard."""

    def __init__(self, group: Processes, api: Api, base_url: str, driver: Any, shots: Screenshots):
        self.group = group
        self.api = api
        self.base_url = base_url
        self.driver = driver
        self.shots = shots
        self.prefix = f"ui{uuid.uuid4().hex[:6]}"

    def wait(self, condition: Any, what: str, timeout: float = 45) -> Any:
        """Wait for a condition on the page, failing with every process's log."""
        return wait_until(condition, timeout, what, self.group)

    def start_fleet(self, name: str, experiment_id: str, devices: int, *flags: str) -> None:
        """Start a fleet of ``devices`` for the experiment."""
        self.group.start(
            name,
            "fleet",
            "--devices",
            str(devices),
            "--experiment",
            experiment_id,
            "--prefix",
            self.prefix,
            *flags,
        )

    def trace(self, delays: dict[int, float]) -> str:
        """Write a speed trace (device index -> extra seconds) and return its path."""
        path = self.group.workdir / f"trace-{len(list(self.group.workdir.glob('trace-*')))}.json"
        path.write_text(json.dumps({str(i): d for i, d in delays.items()}))
        return str(path)

    def online(self) -> str:
        """Return the page's device summary line."""
        return text(self.driver, "#device-summary")


@pytest.fixture
def deployment(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    require(MQTT_PORT, "mqtt")
    namespace = f"dash{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = deployment_env(
        tmp_path, mqtt_url(), port, f"{namespace}-aggregators", FEDMQ_NAMESPACE=namespace
    )
    api = Api(env["FEDMQ_SERVER_URL"])
    prefix = request.node.name.removeprefix("test_").replace("_", "-")[:40]
    with processes(tmp_path, env) as group, chromium(tmp_path / "downloads") as driver:
        start_service_and_worker(group, api, port, f"{namespace}-worker")
        shots = Screenshots(driver, tmp_path / "screenshots", prefix)
        yield Deployment(group, api, env["FEDMQ_SERVER_URL"], driver, shots)


def _count(deployment: Deployment, name: str) -> int:
    """Return a count of the round in flight as the page shows it (-1: none shown)."""
    value = text(deployment.driver, f"#live [data-count={name}]")
    return int(value) if value.isdigit() else -1


def _seconds_left(deployment: Deployment) -> int:
    """Return the seconds to the deadline of the round in flight the page shows (-1: none)."""
    found = re.match(r"(\d+) s left", text(deployment.driver, "#live [data-left]"))
    return int(found[1]) if found else -1


def _points(deployment: Deployment, chart: str) -> int:
    """Return how many rounds a chart on the page plots (0: no such chart)."""
    return int(attribute(deployment.driver, f"svg[data-chart={chart}]", "data-points") or 0)


def test_the_dashboard_drives_a_whole_run(deployment: Deployment) -> None:
    d = deployment
    sign_in(d.driver, d.base_url, TOKEN)
    # An example config fills the editor; the run's own config replaces it.
    d.wait(lambda: "digits_fedavg.json" in text(d.driver, "#example"), "the example configs")
    click(d.driver, "#example option[value=digits_fedavg]")
    d.wait(lambda: "digits-fedavg-demo" in attribute(d.driver, "#config", "value"), "the example")
    # DP-FedAvg: each committed round reports the privacy spent, which the page charts.
    config = _config("dashboard-run", deadline_s=5.0)
    config["strategy"] = {"name": "dpfedavg", "clip_norm": 2.0, "noise_multiplier": 0.1}
    fill(d.driver, "#config", json.dumps(config))
    click(d.driver, "#create-button")
    experiment_id = d.wait(
        lambda: attribute(d.driver, "#experiment", "data-experiment"), "the created experiment"
    )
    # The last device is 30 s late: every round trains until its 5 s deadline and commits
    # the other 19 updates, so a stop lands in the training phase, where it is never too late.
    d.start_fleet("fleet", experiment_id, 20, "--profile", d.trace({19: 30.0}))
    d.wait(lambda: d.online().startswith("20 devices: 20 online"), "20 devices online")
    fill(d.driver, "#round-count", "20")
    click(d.driver, "#start")

    d.wait(lambda: _points(d, "epsilon") >= 2, "two rounds charted, epsilon included")
    d.wait(
        lambda: _count(d, "reported") == 19 and _seconds_left(d) >= 2,
        "live progress of a round waiting for its last device",
    )
    live = text(d.driver, "#live")
    d.shots.take("1-live")
    click(d.driver, "#stop")
    d.wait(lambda: "stopped by the operator" in text(d.driver, "[data-explains=abandoned]"), "stop")
    d.wait(lambda: attribute(d.driver, "#experiment", "data-state") == "idle", "idle")
    d.shots.take("2-stopped")
    click(d.driver, "#versions a[data-version='1']")
    downloaded = d.group.workdir / "downloads" / f"{experiment_id}-v1.safetensors"
    d.wait(lambda: downloaded.exists() and downloaded.stat().st_size > 0, "the v1 download")

    assert re.search(r"Round \d+ in flight: training", live), live
    assert "selected 20" in live and "reported 19" in live and "19 of 20 (minimum 16)" in live
    rounds = d.api.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
    epsilon = text(d.driver, "#rounds tr[data-round='1'] td:nth-child(10)")  # the ε column
    assert float(epsilon) == pytest.approx(rounds[0]["metrics"]["epsilon"], abs=1e-3)
    assert rounds[-1]["state"] == "abandoned", rounds
    assert rounds[-1]["reason"] == "stopped by the operator"
    assert all(r["state"] == "committed" for r in rounds[:-1]) and len(rounds) >= 3
    experiment = d.api.call("GET", f"/experiments/{experiment_id}")
    assert experiment["state"] == "idle" and experiment["rounds_requested"] == len(rounds)
    assert downloaded.read_bytes() == d.api.call(
        "GET", f"/experiments/{experiment_id}/model?version=1"
    )
    row = text(d.driver, f"#rounds tr[data-round='{rounds[-1]['round']}']")
    assert "abandoned" in row and "stopped by the operator" in row
    assert console_errors(d.driver) == []  # a CSP violation or a script error would be here
    d.group.children["fleet"].kill()  # its last device would sleep out its 30 s


def test_the_dashboard_explains_why_an_experiment_waits_and_a_round_was_abandoned(
    deployment: Deployment,
) -> None:
    d = deployment
    config = _config("dashboard-explains", over_selection=1.0, min_reports=16, deadline_s=4.0)
    experiment_id = d.api.call("POST", "/experiments", config)["id"]
    d.start_fleet("fleet", experiment_id, 10)
    sign_in(d.driver, d.base_url, TOKEN, experiment_id)
    d.wait(lambda: d.online().startswith("10 devices: 10 online"), "10 devices online")
    fill(d.driver, "#round-count", "1")
    click(d.driver, "#start")

    waiting = d.wait(lambda: text(d.driver, "[data-explains=waiting]"), "the waiting explanation")
    d.shots.take("1-waiting")
    # Ten more, too slow for the 4 s deadline: the round starts and is abandoned.
    slow = d.trace({i: 6.0 for i in range(10, 20)})
    d.start_fleet("slow-fleet", experiment_id, 10, "--first", "10", "--profile", slow)
    abandoned = d.wait(
        lambda: text(d.driver, "[data-explains=abandoned]"), "the abandoned explanation", 60
    )
    d.shots.take("2-abandoned")

    assert waiting == "Waiting for 16 devices, 10 online."
    shape = r"Round 1 was abandoned: only (\d+) valid update\(s\), 16 needed\."
    match = re.fullmatch(shape, abandoned)
    assert match and int(match[1]) < 16, abandoned
    row = text(d.driver, "#rounds tr[data-round='1']")
    assert "abandoned" in row and "16 needed" in row
    (record,) = d.api.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
    assert record["state"] == "abandoned" and record["reason"] in abandoned
    assert attribute(d.driver, "#experiment", "data-state") == "idle"
    assert console_errors(d.driver) == []
