"""The broker ``fedmq demo`` starts by itself: both backends carry messages and clean up."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import Delivery, TransportError
from broker.embedded import EmbeddedBroker, find_mosquitto
from broker.mqtt import MqttTransport
from tests.broker.conftest import wait_until
from tests.brokers import skip_or_fail


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(params=["mosquitto", "amqtt"])
def embedded(request: pytest.FixtureRequest) -> Iterator[EmbeddedBroker]:
    if request.param == "mosquitto" and find_mosquitto() is None:
        skip_or_fail("no mosquitto binary installed")
    if request.param == "amqtt":
        pytest.importorskip("amqtt")
    broker = EmbeddedBroker(request.param).start()
    yield broker
    broker.stop()


def test_a_message_makes_the_round_trip_through_the_transport(embedded: EmbeddedBroker) -> None:
    sep = "&" if "?" in embedded.url else "?"
    consumer = MqttTransport(f"{embedded.url}{sep}client_id=embedded-consumer")
    publisher = MqttTransport(embedded.url)
    received: list[bytes] = []
    lock = threading.Lock()

    def handler(delivery: Delivery) -> None:
        with lock:
            received.append(delivery.body)
        delivery.ack()

    try:
        consumer.subscribe("fedmq/updates/demo", handler, group="fedmq-aggregators")
        publisher.publish("fedmq/updates/demo", b"update-1")
        publisher.publish("fedmq/updates/demo", b"x" * 400_000)

        assert wait_until(lambda: len(received) == 2)
        assert received == [b"update-1", b"x" * 400_000]
    finally:
        publisher.close()
        consumer.close()


def test_the_url_names_the_loopback_port_it_listens_on(embedded: EmbeddedBroker) -> None:
    assert embedded.url.startswith(f"mqtt://127.0.0.1:{embedded.port}")
    assert embedded.url.endswith("?protocol=3.1.1") == (embedded.backend == "amqtt")
    assert _accepts(embedded.port)


def test_stop_releases_the_port_and_can_be_repeated(embedded: EmbeddedBroker) -> None:
    port = embedded.port

    embedded.stop()
    embedded.stop()

    assert not _accepts(port)
    with pytest.raises(TransportError, match="not running"):
        _ = embedded.url


def test_stop_reaps_the_mosquitto_child_and_removes_its_files() -> None:
    if find_mosquitto() is None:
        skip_or_fail("no mosquitto binary installed")
    broker = EmbeddedBroker("mosquitto").start()
    process = broker._server._proc  # type: ignore[union-attr]
    assert process is not None and process.poll() is None
    config = Path(process.args[2])
    assert config.exists()

    broker.stop()

    assert process.returncode is not None
    assert not config.parent.exists()


def test_auto_prefers_mosquitto_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    if find_mosquitto() is None:
        skip_or_fail("no mosquitto binary installed")
    assert EmbeddedBroker().backend == "mosquitto"

    monkeypatch.setattr("broker.embedded.find_mosquitto", lambda: None)
    assert EmbeddedBroker().backend == "amqtt"


def test_it_works_as_a_context_manager() -> None:
    with EmbeddedBroker() as broker:
        port = broker.port
        assert _accepts(port)
    assert not _accepts(port)
