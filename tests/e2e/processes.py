"""Start FedMQ's commands as real processes and talk to the service over HTTP."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker.topics import DEFAULT_NAMESPACE
from tests.brokers import amqp_url, bridge_groups, delete_amqp_groups

TOKEN = "e2e-admin-token"
SEED = 7
"""The experiments' seed: not 0, the seed a process falls back to without one.

A process that dropped the experiment's seed (a fleet partitioning the data
set, or its devices shuffling, with seed 0) would then train another model
than ``fedmq simulate`` and fail the comparison; with seed 0 it would pass.
"""
_NARROWER_TOKENS = ("FEDMQ_ENROLLMENT_TOKEN", "FEDMQ_VIEWER_TOKEN")


class Processes:
    """Started child processes, their logs, and teardown."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        # The admin token is every child's credential (the fleet enrolls its devices
        # and reads the experiment with it): narrower tokens a developer's shell may
        # hold would be tried first, so they are not inherited.
        inherited = {k: v for k, v in os.environ.items() if k not in _NARROWER_TOKENS}
        self.env = {**inherited, **env, "FEDMQ_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.bridges: list[str] = []
        """The names of the bridges started, whose group queues teardown deletes."""

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start ``fedmq ARGS`` with its output in ``workdir/<name>.log``."""
        if "bridge" in args and "--name" in args:
            self.bridges.append(args[args.index("--name") + 1])
        log = (self.workdir / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmq", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )
        self.children[name] = proc
        return proc

    def log(self, name: str) -> str:
        """Return what a child printed so far."""
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        """Return every child's output, for assertion messages."""
        return "\n".join(f"--- {n} ---\n{self.log(n)[-3000:]}" for n in self.children)

    def stop(self) -> None:
        """Terminate every child (SIGTERM, then SIGKILL)."""
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.children.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def amqp_groups(self) -> list[str]:
        """Return the durable group queues the deployment's workers and bridges declare on AMQP."""
        namespace = self.env.get("FEDMQ_NAMESPACE", DEFAULT_NAMESPACE)
        workers = self.env.get("FEDMQ_WORKER_GROUP", f"{namespace}-aggregators")
        return [workers, *(g for name in self.bridges for g in bridge_groups(namespace, name))]


@contextmanager
def processes(workdir: Path, env: dict[str, str]) -> Iterator[Processes]:
    """Yield a process group that is torn down whatever happens.

    On the shared RabbitMQ, teardown also deletes the deployment's durable
    group queues once its processes are gone, whether the test passed or not:
    a queue left behind would keep a copy of every later update published in
    its namespace, which every test that sets none shares. A test's private
    broker goes with the test.
    """
    group = Processes(workdir, env)
    try:
        yield group
    finally:
        try:
            group.stop()
        finally:
            if env.get("FEDMQ_BROKER_URL") == amqp_url():
                delete_amqp_groups(group.amqp_groups())


class Api:
    """A tiny client of the service's REST API."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base}/api/v1{path}",
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            kind = response.headers.get("Content-Type", "")
            return json.loads(raw) if kind.startswith("application/json") else raw

    def healthy(self) -> bool:
        """Return whether the server answers its health check."""
        try:
            return bool(self.call("GET", "/health") == {"status": "ok"})
        except OSError:
            return False

    def round_states(self, experiment_id: str) -> dict[int, str]:
        """Return each round's state by number (the API answers while a broker is down)."""
        rounds = self.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
        return {r["round"]: r["state"] for r in rounds}

    def checked_in(self) -> int:
        """Return how many devices have checked in (registered is not online)."""
        return sum(1 for d in self.call("GET", "/devices")["devices"] if d["last_seen"])


def wait_until(condition: Any, timeout: float, what: str, group: Processes) -> Any:
    """Poll ``condition()`` until truthy; fail with every child's log on timeout."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        for name, proc in group.children.items():
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}\n{group.logs()}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{group.logs()}")


def wait_healthy(group: Processes, api: Api) -> None:
    """Wait for the server's health check; fail at once, with the logs, if a child exits.

    Once it answers, the server has written the service key workers pin.
    """
    wait_until(api.healthy, 60, "the server's health check", group)


def wait_checked_in(group: Processes, api: Api, count: int, where: str = "") -> None:
    """Wait until ``count`` devices of the deployment have checked in."""
    wait_until(lambda: api.checked_in() == count, 90, f"{count} devices to check in{where}", group)


def deployment_env(
    workdir: Path, broker_url: str, port: int, group: str, **extra: str
) -> dict[str, str]:
    """Return the FEDMQ_* environment of one test deployment in ``workdir``.

    Its processes share one ``FEDMQ_HOME`` and so one key folder: the server
    writes ``keys/service.pub`` at start, which a worker needs before it starts
    (start the server first and wait for it), and each worker's public key,
    which the server trusts. A restarted server keeps its key. Each deployment
    has a namespace of its own (``extra`` may name one), so runs sharing a
    broker never meet.
    """
    home = workdir / "home"
    return {
        "FEDMQ_NAMESPACE": f"e2e{uuid.uuid4().hex[:10]}",
        "FEDMQ_HOME": str(home),
        "FEDMQ_KEYS": str(home / "keys"),
        "FEDMQ_BROKER_URL": broker_url,
        "FEDMQ_STORE_URL": (workdir / "store").as_uri(),
        "FEDMQ_DB_URL": f"sqlite:///{workdir / 'fedmq.db'}",
        "FEDMQ_SERVER_URL": f"http://127.0.0.1:{port}",
        "FEDMQ_WORKER_GROUP": group,
        **extra,
    }


def start_service_and_worker(
    group: Processes, api: Api, port: int, worker: str, *worker_flags: str
) -> None:
    """Start the server, then (once it has written the service key the worker pins) a worker."""
    group.start("server", "server", "--port", str(port))
    wait_healthy(group, api)
    start_worker(group, "worker", worker, *worker_flags)


def start_worker(group: Processes, process: str, name: str, *flags: str) -> None:
    """Start ``fedmq worker --name NAME`` as child ``process`` and wait until it listens."""
    start_workers(group, {process: name}, *flags)


def start_workers(group: Processes, names: Mapping[str, str], *flags: str) -> None:
    """Start a worker per ``{process: name}``, all at once, and wait until each listens."""
    for process, name in names.items():
        group.start(process, "worker", "--name", name, *flags)
    for process in names:
        wait_until(lambda: "fedmq worker on" in group.log(process), 60, process, group)  # noqa: B023


def start_fleet(
    group: Processes,
    api: Api,
    experiment_id: str,
    *flags: str,
    process: str = "fleet",
    devices: int = 20,
    online: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start a fleet of ``devices`` for the experiment as child ``process``; return it.

    Waits until ``online`` devices of the deployment (this fleet's and any
    started before it; default ``devices``) have checked in.
    """
    fleet = group.start(
        process, "fleet", "--devices", str(devices), "--experiment", experiment_id, *flags
    )
    wait_checked_in(group, api, devices if online is None else online)
    return fleet


def fleet_totals(group: Processes, name: str) -> dict[str, int]:
    """Return the totals (tasks, uploads, failures...) fleet ``name`` printed as it stopped."""
    for line in group.log(name).splitlines():
        if line.startswith("fedmq fleet stopped: "):
            totals: dict[str, int] = ast.literal_eval(line.removeprefix("fedmq fleet stopped: "))
            return totals
    raise AssertionError(f"{name} printed no totals: has it stopped?\n{group.logs()}")


def rounds_when_done(api: Api, experiment_id: str, count: int) -> list[dict[str, Any]] | None:
    """Return the experiment's rounds once ``count`` of them have ended, else None."""
    rounds: list[dict[str, Any]] = api.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
    done = [r for r in rounds if r["state"] != "training"]
    return rounds if len(done) == count else None


def max_difference(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> float:
    """Return the largest absolute difference between two weight sets with the same names."""
    assert set(actual) == set(expected), "the models have different tensors"
    return max(float(abs(actual[k] - expected[k]).max()) for k in expected)
