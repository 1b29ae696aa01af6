"""The emulated fleet on one MQTT hub, and its heartbeats spread over their interval."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from broker import (
    CheckIn,
    ComeBackLater,
    Delivery,
    MemoryTransport,
    ModelRef,
    ModelUpdate,
    TrainTask,
    Transport,
    decode,
    encode_weights,
)
from broker.mqtt_hub import HubClient, HubPool
from broker.topics import Topics
from device_sdk import DeviceContext, TrainResult
from device_sdk.app import TrainHandler
from device_sdk.emulator.fleet import Fleet, fleet_transports
from device_sdk.emulator.profiles import SpeedProfile
from tests.brokers import MQTT_PORT, mqtt_url, require
from tests.identities import SERVICE, device, grant, sign

DATA = {"dataset": "digits", "partition": "iid"}


def _noop(x: np.ndarray, y: np.ndarray, index: int) -> TrainHandler:
    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        return TrainResult(ctx.weights, len(x), {"loss": 0.0})

    return train


def _enroll(identity: object, platform: str) -> bytes:
    return SERVICE.public_key


class Service:
    """A stand-in coordinator: records check-ins (by device) and updates."""

    def __init__(self, transport: Transport, topics: Topics) -> None:
        self.checkins: list[tuple[str, float]] = []
        self.updates: list[ModelUpdate] = []
        self.lock = threading.Lock()
        transport.subscribe(topics.all_checkins, self._record)
        transport.subscribe(topics.all_updates, self._record)

    def _record(self, delivery: Delivery) -> None:
        message = decode(delivery.body)
        with self.lock:
            if isinstance(message, CheckIn):
                self.checkins.append((message.device_id, time.monotonic()))
            elif isinstance(message, ModelUpdate):
                self.updates.append(message)
        delivery.ack()

    def count(self, device_id: str | None = None) -> int:
        with self.lock:
            return sum(1 for d, _ in self.checkins if device_id in (None, d))


def _wait(condition: object, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def pool() -> Iterator[HubPool]:
    require(MQTT_PORT, "Mosquitto")
    pool = fleet_transports(mqtt_url(), session_expiry_s=30, workers=2)
    yield pool
    pool.close()


def test_a_fleet_on_one_hub_checks_in_trains_and_comes_back(pool: HubPool, tmp_path: Path) -> None:
    topics = Topics(f"t{uuid.uuid4().hex[:8]}")
    service = Service(pool(f"svc-{topics.namespace}"), topics)
    devices = 100
    fleet = Fleet(
        pool,
        {**DATA, "devices": devices},
        seed=0,
        make_trainer=_noop,
        enroll=_enroll,
        topics=topics,
        prefix=f"hub{uuid.uuid4().hex[:4]}",
        identities=device,
    )
    try:
        assert all(isinstance(d._transport, HubClient) for d in fleet.devices)
        fleet.start()
        assert _wait(lambda: service.count() == devices)
        ids = [d.device_id for d in fleet.devices]

        # Pace steering for everyone: each checks in again, from the fleet's one scheduler.
        sender = pool(f"send-{topics.namespace}")
        later = sign(ComeBackLater(experiment_id="e1", retry_after_s=0.2))
        for device_id in ids:
            sender.publish(topics.device(device_id), later)
        assert _wait(lambda: service.count() == 2 * devices)
        assert {d for d, _ in service.checkins} == set(ids)

        # A task for ten of them: they train off the hub's thread and publish their updates.
        weights = encode_weights({"w": np.ones(4, np.float32)})
        (tmp_path / "w").write_bytes(weights)
        ref = ModelRef((tmp_path / "w").as_uri(), hashlib.sha256(weights).hexdigest(), len(weights))
        for device_id in ids[:10]:
            task = TrainTask(experiment_id="e1", round=1, base_version=0, model=ref)
            task = dataclasses.replace(task, grant=grant("e1", 1, device_id, task.message_id))
            sender.publish(topics.device(device_id), sign(task))
        assert _wait(lambda: len(service.updates) == 10)
        assert sorted(u.device_id for u in service.updates) == sorted(ids[:10])
    finally:
        fleet.stop()
    hub_threads = [t.name for t in threading.enumerate() if t.name.startswith("fedmq-fleet-hub")]
    assert len(hub_threads) == 5  # network, two connectors, two lane workers


def test_heartbeats_are_spread_over_their_interval() -> None:
    bus = MemoryTransport()
    topics = Topics()
    service = Service(bus, topics)
    devices = 20
    fleet = Fleet(
        lambda client_id, will: bus,
        {**DATA, "devices": devices},
        seed=0,
        make_trainer=_noop,
        enroll=_enroll,
        topics=topics,
        identities=device,
    )
    started = time.monotonic()
    fleet.start(heartbeat_s=1.0)
    try:
        assert _wait(lambda: (bus.join(timeout=1) or True) and service.count() >= 2 * devices, 5)
    finally:
        fleet.stop()
        bus.close()

    beats = sorted(at - started for _, at in service.checkins[devices : 2 * devices])
    assert beats[0] >= 0.9  # the first beat waits one interval, as before
    assert (
        beats[-1] - beats[0] >= 0.8
    )  # ... and the fleet's beats take the interval, not an instant
    assert {d for d, _ in service.checkins[devices : 2 * devices]} == {
        d.device_id for d in fleet.devices
    }


def test_a_device_away_by_its_trace_skips_its_heartbeats() -> None:
    bus = MemoryTransport()
    topics = Topics()
    service = Service(bus, topics)
    fleet = Fleet(
        lambda client_id, will: bus,
        {**DATA, "devices": 6},
        seed=0,
        indices=range(2, 6),
        make_trainer=_noop,
        enroll=_enroll,
        topics=topics,
        identities=device,
    )
    away = {3, 5}  # fleet indices, not positions: the fleet starts at index 2
    fleet.start(heartbeat_s=0.2, online=lambda index: index not in away)
    try:
        assert _wait(lambda: (bus.join(timeout=1) or True) and service.count() >= 4 + 3 * 2, 5)
    finally:
        fleet.stop()
        bus.close()

    beats = {d.device_id: service.count(d.device_id) for d in fleet.devices}
    by_index = dict(zip(fleet.indices, fleet.devices, strict=True))
    assert all(beats[by_index[i].device_id] == 1 for i in away), beats  # the start only
    assert all(beats[by_index[i].device_id] >= 3 for i in (2, 4)), beats


def test_a_fleet_too_large_for_the_open_files_limit_is_refused_up_front() -> None:
    from broker import TransportError

    def hub_threads() -> int:
        return sum(1 for t in threading.enumerate() if t.name.startswith("fedmq-fleet-hub"))

    before = hub_threads()
    with pytest.raises(TransportError, match="1000000 more clients do not fit.*open files"):
        fleet_transports(mqtt_url(), devices=1_000_000)
    assert hub_threads() == before  # the pool closed its hub


def test_stopping_a_fleet_ends_a_slowed_devices_delay_and_its_task(tmp_path: Path) -> None:
    # Prepare: device 0 sleeps a minute after training, on a thread of its own.
    bus = MemoryTransport()
    topics = Topics()
    service = Service(bus, topics)
    trained = threading.Event()
    threads: list[threading.Thread] = []

    def make_trainer(x: np.ndarray, y: np.ndarray, index: int) -> TrainHandler:
        def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
            trained.set()
            return TrainResult(ctx.weights, len(x), {"loss": 0.0})

        return train

    def on_a_thread(job: Callable[[], None]) -> None:
        threads.append(threading.Thread(target=job, name="slow-device"))
        threads[-1].start()

    fleet = Fleet(
        lambda client_id, will: bus,
        {**DATA, "devices": 1},
        seed=0,
        make_trainer=make_trainer,
        enroll=_enroll,
        topics=topics,
        identities=device,
        run=on_a_thread,
        speed=SpeedProfile(delays_s={0: 60.0}),
    )
    fleet.start()
    weights = encode_weights({"w": np.ones(4, np.float32)})
    (tmp_path / "w").write_bytes(weights)
    ref = ModelRef((tmp_path / "w").as_uri(), hashlib.sha256(weights).hexdigest(), len(weights))
    device_id = fleet.devices[0].device_id
    task = TrainTask(experiment_id="e1", round=1, base_version=0, model=ref)
    task = dataclasses.replace(task, grant=grant("e1", 1, device_id, task.message_id))
    bus.publish(topics.device(device_id), sign(task))
    assert trained.wait(10)

    # Execute
    stopped_at = time.monotonic()
    fleet.stop()
    threads[0].join(timeout=10)

    # Assert
    bus.join(timeout=1)
    bus.close()
    assert not threads[0].is_alive()
    assert time.monotonic() - stopped_at < 5  # not the minute the delay had left
    assert service.updates == []  # the task ended unanswered, as a device switched off would
