"""`fedmq worker --processes 2`: the aggregator worker behind the offload proxy, on Mosquitto."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np

from broker import (
    Delivery,
    Handler,
    ModelRef,
    ModelUpdate,
    RoundCommitted,
    RoundOpened,
    Subscription,
    Transport,
    decode_weights,
    encode_weights,
)
from broker.offload import OffloadedProcess
from broker.topics import Topics
from fedmq.processes import start_worker
from fedmq.wiring import transport_factory
from model_store import LocalStore
from tests.aggregator_service.round_driver import RoundDriver
from tests.broker.conftest import wait_until
from tests.brokers import MQTT_PORT, mqtt_url, require
from tests.identities import SERVICE, sign

REPO = Path(__file__).resolve().parents[2]
DEVICES = tuple(f"dev{i:02d}" for i in range(12))
PARAMS = 1000
SESSION_S = 30
"""Sessions outlive these tests briefly: a lingering one would queue everyone's updates."""


def _keys_with_the_service_key(root: Path) -> Path:
    """Return a key folder holding the test service's public key, as the server would leave it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "service.pub").write_text(SERVICE.public_key_text + "\n")
    return root


class Settlements:
    """Wraps the real transport and records how deliveries under one topic prefix are settled."""

    def __init__(self, inner: Transport, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix
        self.settled: dict[bytes, list[str]] = defaultdict(list)

    def publish(self, topic: str, body: bytes) -> None:
        self.inner.publish(topic, body)

    def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> Subscription:
        def record(delivery: Delivery) -> None:
            if delivery.topic.startswith(self.prefix):
                delivery = _Recorded(delivery, self.settled[delivery.body])
            handler(delivery)

        return self.inner.subscribe(topic, record, group=group)

    def close(self) -> None:
        self.inner.close()


class _Recorded:
    """A delivery that notes each settlement before passing it on."""

    def __init__(self, inner: Delivery, log: list[str]) -> None:
        self._inner = inner
        self._log = log
        self.topic, self.body, self.redelivered = inner.topic, inner.body, inner.redelivered

    def ack(self) -> None:
        self._log.append("ack")
        self._inner.ack()

    def nack(self, requeue: bool = False) -> None:
        self._log.append("requeue" if requeue else "dead")
        self._inner.nack(requeue)


def _round(store: LocalStore, experiment: str) -> tuple[RoundOpened, list[bytes]]:
    """Publish version 0 and return the round's announcement and its updates."""
    base = encode_weights({"w": np.zeros(PARAMS, np.float32)})
    manifest = store.publish(experiment, 0, {"weights.safetensors": (base, "x")}, parent=None)
    opened = RoundOpened(
        experiment_id=experiment,
        round=1,
        base_version=0,
        model=ModelRef("memory://", manifest.artifacts["weights.safetensors"].sha256, len(base)),
        selected=DEVICES,
        target_reports=len(DEVICES),
        min_reports=len(DEVICES),
        deadline_at=0.0,
        strategy={"name": "fedavg"},
    )
    updates = [
        sign(  # each device's own signed update, carrying the service's grant of its task
            ModelUpdate(
                experiment_id=experiment,
                round=1,
                device_id=device,
                base_version=0,
                task_id=f"t-{device}",
                num_examples=1,
                inline_weights=encode_weights({"w": np.full(PARAMS, i, np.float32)}),
            )
        )
        for i, device in enumerate(DEVICES)
    ]
    return opened, updates


def test_an_offloaded_worker_commits_a_round_over_mosquitto_acking_each_update_once(
    tmp_path: Path,
) -> None:
    require(MQTT_PORT, "Mosquitto")
    uid = uuid.uuid4().hex[:8]
    experiment, name, group = f"offload-{uid}", f"offload-worker-{uid}", f"offload-{uid}"
    store = LocalStore(tmp_path / "store")
    opened, updates = _round(store, experiment)
    # A namespace of its own: no other deployment's traffic on the shared broker reaches it.
    topics = Topics(f"offload-{uid}")
    open_transport = transport_factory(mqtt_url(), session_expiry_s=SESSION_S)
    driver = open_transport(f"offload-driver-{uid}")
    rounds = RoundDriver(driver, topics)  # the coordinator's part: close, then combine
    outcomes = rounds.outcomes
    real = Settlements(open_transport(name), f"{topics.namespace}/updates/{experiment}/")
    settings = {
        "store_url": store.root.as_uri(),
        "name": name,
        "group": group,
        "checkpoint_every": 5,
        "keys_dir": str(_keys_with_the_service_key(tmp_path / "keys")),
        "namespace": topics.namespace,
    }
    worker = OffloadedProcess(start_worker, settings)
    try:
        worker.wait_booted(timeout=120).serve(real, timeout=60)
        rounds.open(opened)
        for device, update in zip(DEVICES, updates, strict=True):
            driver.publish(topics.updates(experiment, device), update)
        assert wait_until(lambda: bool(outcomes), timeout=60)
        assert wait_until(lambda: sum(map(len, real.settled.values())) >= len(updates))
    finally:
        worker.stop()
        real.close()
        driver.close()

    committed = outcomes[0]
    assert isinstance(committed, RoundCommitted)
    assert committed.sender == name and committed.refused == {}  # signed by the worker
    assert sorted(committed.accepted_devices) == sorted(DEVICES)
    mean = decode_weights(store.get_blob(committed.model.sha256))["w"]
    assert np.allclose(mean, np.mean(range(len(DEVICES))))
    assert {body: log for body, log in real.settled.items()} == {u: ["ack"] for u in updates}
    assert (worker.failed, worker.exitcode) == (False, 0)


def _worker_child(parent: int) -> int:
    """Return the pid of the worker process ``parent`` spawned (not the resource tracker)."""
    with open(f"/proc/{parent}/task/{parent}/children") as listing:
        children = [int(pid) for pid in listing.read().split()]
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if b"spawn_main" in cmdline.read():
                return pid
    raise AssertionError(f"no worker process among {children}")


def test_the_worker_command_exits_non_zero_when_its_worker_process_dies(tmp_path: Path) -> None:
    require(MQTT_PORT, "Mosquitto")
    uid = uuid.uuid4().hex[:8]
    command = [
        *(sys.executable, "-m", "fedmq", "worker", "--processes", "2"),
        *("--broker", mqtt_url(session_expiry=str(SESSION_S))),
        *("--store", (tmp_path / "store").as_uri()),
        *("--name", f"offload-cli-{uid}", "--group", f"offload-cli-{uid}"),
        *("--keys", str(_keys_with_the_service_key(tmp_path / "keys"))),
        *("--namespace", f"offload-cli-{uid}"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path, env=env
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().decode()
        assert first.startswith("fedmq worker on"), first

        os.kill(_worker_child(proc.pid), 9)
        status = proc.wait(timeout=30)
        output = proc.stdout.read().decode()
    finally:
        proc.kill()
        proc.wait()

    assert status == 1, output
    assert "the worker process exited with status -9" in output
