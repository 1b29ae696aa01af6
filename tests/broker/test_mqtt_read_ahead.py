"""The MQTT transport reads a backlog only as far ahead of its handlers as its budget allows."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from broker import Delivery
from broker._mqtt_routing import Dispatcher
from broker.mqtt import READ_AHEAD_WAIT_S, MqttTransport
from tests.broker.conftest import wait_until
from tests.brokers import MQTT_PORT, mqtt_url, require


def _delivery(size: int) -> Any:
    return SimpleNamespace(body=b"x" * size, topic="t", settled=None)


def _blocking(release: threading.Event) -> Callable[[Delivery], None]:
    def handler(_delivery: Delivery) -> None:
        release.wait(5)

    return handler


def test_the_reader_waits_while_the_handler_is_behind_and_goes_on_when_it_catches_up() -> None:
    release = threading.Event()
    dispatcher = Dispatcher("read-ahead-test", read_ahead=250)
    try:
        for _ in range(4):  # the first one blocks the handler; three wait: 300 bytes
            dispatcher.submit(_blocking(release), _delivery(100))
        assert wait_until(lambda: dispatcher.queued_bytes == 300)
        started = time.monotonic()
        assert dispatcher.wait_for_room(0.2) is False  # bounded: the reader goes on after it
        assert time.monotonic() - started >= 0.2
        assert dispatcher.wait_for_room(0.2, held=lambda: 0) is False
        release.set()
        assert dispatcher.wait_for_room(5) is True
        assert wait_until(lambda: dispatcher.queued_bytes == 0)
        # Bytes parked elsewhere count too.
        assert dispatcher.wait_for_room(0.05, held=lambda: 251) is False
        assert dispatcher.wait_for_room(0.05, held=lambda: 250) is True
    finally:
        dispatcher.stop()


def test_a_handler_call_running_long_counts_as_stalled() -> None:
    release, started = threading.Event(), threading.Event()
    dispatcher = Dispatcher("read-ahead-stall", read_ahead=0)

    def stuck(_delivery: Delivery) -> None:
        started.set()
        release.wait(5)

    try:
        assert not dispatcher.stalled(0.0)  # idle is not stalled
        dispatcher.submit(stuck, _delivery(10))
        assert started.wait(5)
        assert not dispatcher.stalled(5.0)
        time.sleep(0.1)
        assert dispatcher.stalled(0.05)
        release.set()
        assert wait_until(lambda: not dispatcher.stalled(0.0))
    finally:
        release.set()
        dispatcher.stop()


def test_stopping_releases_a_waiting_reader() -> None:
    release = threading.Event()
    dispatcher = Dispatcher("read-ahead-stop", read_ahead=0)
    dispatcher.submit(_blocking(release), _delivery(10))
    dispatcher.submit(lambda _d: None, _delivery(10))
    waited: list[bool] = []
    reader = threading.Thread(target=lambda: waited.append(dispatcher.wait_for_room(30)))
    reader.start()
    assert wait_until(lambda: dispatcher._waiting == 1)  # the reader waits before the stop
    dispatcher.stop(timeout=0)
    reader.join(5)
    release.set()
    assert waited == [True]


@pytest.fixture
def small_budget(monkeypatch: pytest.MonkeyPatch) -> int:
    budget = 1_000_000
    monkeypatch.setattr(MqttTransport, "READ_AHEAD_BYTES", budget)
    return budget


@pytest.fixture
def transports() -> Iterator[list[MqttTransport]]:
    require(MQTT_PORT, "Mosquitto")
    opened: list[MqttTransport] = []
    yield opened
    for transport in reversed(opened):
        transport.close()


def _offline_backlog(transports: list[MqttTransport], count: int, size: int) -> tuple[str, str]:
    """Queue ``count`` numbered messages of ``size`` bytes for an offline session's group.

    Returns the topic and the session's client id.
    """
    topic = f"test/{uuid.uuid4().hex[:10]}/backlog"
    client_id = f"pace-{uuid.uuid4().hex[:8]}"
    first = MqttTransport(mqtt_url(MQTT_PORT), client_id=client_id)
    transports.append(first)
    first.subscribe(topic, lambda d: d.ack(), group="g")
    first.close()
    publisher = MqttTransport(mqtt_url(MQTT_PORT))
    transports.append(publisher)
    for i in range(count):
        publisher.publish(topic, i.to_bytes(4, "big") * (size // 4))
    return topic, client_id


@pytest.mark.parametrize("subscribe_after_s", [0.0, 0.5])
def test_a_resumed_backlog_is_read_at_the_handlers_pace(
    small_budget: int, transports: list[MqttTransport], subscribe_after_s: float
) -> None:
    # The session's backlog arrives before the subscription that claims it and
    # parks meanwhile: parked messages count toward the budget too.
    size, count = 100_000, 40  # 4 MB of backlog against a 1 MB budget
    topic, client_id = _offline_backlog(transports, count, size)

    resumed = MqttTransport(mqtt_url(MQTT_PORT), client_id=client_id)
    transports.append(resumed)
    read_ahead: list[int] = []
    got: list[int] = []

    def slow(delivery: Delivery) -> None:
        # What the reader holds that no handler has taken: queued and parked.
        read_ahead.append(resumed._dispatcher.queued_bytes + resumed._table.parked_bytes)
        time.sleep(0.01)
        got.append(int.from_bytes(delivery.body[:4], "big"))
        delivery.ack()

    time.sleep(subscribe_after_s)
    resumed.subscribe(topic, slow, group="g")
    assert wait_until(lambda: len(got) == count, timeout=30)
    assert got == list(range(count))
    # One message past the budget, plus one per bounded wait that ran out
    # before anyone took a message (only while nothing subscribed).
    extra = 1 + math.ceil(subscribe_after_s / READ_AHEAD_WAIT_S)
    assert max(read_ahead) <= small_budget + extra * size
    assert max(read_ahead) >= small_budget - 2 * size  # it did read ahead, up to the budget


def test_a_publish_from_another_thread_is_not_held_behind_a_paced_backlog(
    small_budget: int, transports: list[MqttTransport]
) -> None:
    # The broker queues the backlog ahead of the PUBACK; read at the handler's
    # pace (3 s here) the publish would time out (2 s). After a quarter of its
    # timeout the reader reads on to the PUBACK.
    count = 60
    topic, client_id = _offline_backlog(transports, count, 100_000)

    resumed = MqttTransport(mqtt_url(MQTT_PORT, publish_timeout="2"), client_id=client_id)
    transports.append(resumed)
    got: list[int] = []

    def slow(delivery: Delivery) -> None:
        time.sleep(0.05)
        got.append(int.from_bytes(delivery.body[:4], "big"))
        delivery.ack()

    resumed.subscribe(topic, slow, group="g")
    assert wait_until(lambda: len(got) >= 2)
    started = time.monotonic()
    resumed.publish(f"{topic}/elsewhere", b"progress")  # raises if not confirmed in 2 s
    assert time.monotonic() - started < 2.0
    assert wait_until(lambda: len(got) == count, timeout=30)
