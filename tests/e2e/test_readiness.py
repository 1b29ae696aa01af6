"""/ready over real processes: 200 with a worker on the broker, 503 within 5 s of the broker going.

The broker is a private Mosquitto the test kills; the server and a worker
are processes of their own.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from tests.e2e.owned_brokers import owned_mosquitto
from tests.e2e.processes import (
    Api,
    deployment_env,
    processes,
    start_service_and_worker,
    wait_until,
)
from tests.ports import free_port


def _ready(base: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{base}/ready", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_ready_turns_503_within_5_s_of_the_broker_going(tmp_path: Path) -> None:
    namespace = f"ready{uuid.uuid4().hex[:8]}"
    with owned_mosquitto(tmp_path / "broker") as broker:
        port = free_port()
        env = deployment_env(
            tmp_path, broker.url, port, f"{namespace}-aggregators", FEDMQ_NAMESPACE=namespace
        )
        base = env["FEDMQ_SERVER_URL"]
        with processes(tmp_path, env) as group:
            start_service_and_worker(group, Api(base), port, f"{namespace}-worker")
            wait_until(lambda: _ready(base)[0] == 200, 30, "the worker's first beat", group)
            broker.stop(graceful=False)
            gone = time.monotonic()
            status, body = wait_until(
                lambda: (answer := _ready(base))[0] == 503 and answer, 5, "503", group
            )
            took = time.monotonic() - gone

    assert status == 503 and took <= 5.0
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["broker"] == {"ok": False, "detail": "refuses or does not answer"}
    assert checks["database"]["ok"] is True
