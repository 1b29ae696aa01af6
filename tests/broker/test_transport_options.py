"""What every transport takes from ``connect``: a client id, a last will, reconnect listeners."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from broker import Delivery, MemoryTransport, Transport, connect
from broker._amqp_options import parse_url
from broker._mqtt_options import MqttOptions
from broker.amqp import AmqpTransport
from broker.mqtt import MqttTransport
from tests.broker.conftest import wait_until
from tests.brokers import AMQP_PORT, MQTT_PORT, amqp_url, mqtt_url, require
from tests.tcp_proxy import TcpProxy


class Inbox:
    """A handler that acks and records each body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    def __call__(self, delivery: Delivery) -> None:
        delivery.ack()
        with self.lock:
            self.bodies.append(delivery.body)


class Reconnects:
    """A reconnect listener that counts its calls and the threads they came on."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def __call__(self) -> None:
        self.threads.append(threading.current_thread().name)


@pytest.fixture
def root() -> str:
    return f"test/options-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def opened() -> Iterator[list[Transport]]:
    """Transports a test opened, closed after it."""
    transports: list[Transport] = []
    yield transports
    for transport in reversed(transports):
        transport.close()


def _url(kind: str, port: int | None = None) -> str:
    if kind == "memory":
        return "memory://"
    if kind == "amqp":
        require(AMQP_PORT, "RabbitMQ")
        return amqp_url(port or AMQP_PORT)
    require(MQTT_PORT, "Mosquitto")
    return mqtt_url(port or MQTT_PORT)


@pytest.mark.parametrize("kind", ["memory", "amqp", "mqtt"])
def test_every_transport_takes_a_client_id_a_will_and_a_reconnect_listener(
    kind: str, root: str, opened: list[Transport]
) -> None:
    client_id = f"opts-{uuid.uuid4().hex[:8]}"

    transport = connect(
        _url(kind), client_id=client_id, will=(f"{root}/will", b"gone"), on_reconnect=Reconnects()
    )
    opened.append(transport)
    inbox = Inbox()
    transport.subscribe(f"{root}/x", inbox)
    transport.publish(f"{root}/x", b"works")

    assert wait_until(lambda: inbox.bodies == [b"works"])
    if isinstance(transport, MqttTransport):
        assert transport.client_id == client_id


def test_the_in_process_bus_accepts_a_listener_and_never_calls_it() -> None:
    listener = Reconnects()
    transport = MemoryTransport.from_url("memory://", client_id="x", will=("t/will", b"w"))
    transport.on_reconnect(listener)

    transport.publish("t/x", b"x")
    transport.join(timeout=5)
    transport.close()

    assert listener.threads == []


# -- AMQP -----------------------------------------------------------------------------


def test_an_amqp_client_id_names_the_connection() -> None:
    by_keyword = parse_url("amqp://u:p@h/v", client_id="worker-1")
    by_query = parse_url("amqp://u:p@h/v?client_id=worker-2&heartbeat=10")
    overridden = parse_url("amqp://u:p@h/v?client_id=worker-2", client_id="worker-3")

    assert by_keyword.params.client_properties == {"connection_name": "worker-1"}
    assert by_query.params.client_properties == {"connection_name": "worker-2"}
    assert by_query.params.heartbeat == 10
    assert overridden.params.client_properties == {"connection_name": "worker-3"}


def test_amqp_credentials_come_from_the_userinfo() -> None:
    options = parse_url("amqp://fedmq:p%40ss%2Fword@h:5673/fedmq-test")

    assert options.params.credentials.username == "fedmq"
    assert options.params.credentials.password == "p@ss/word"
    assert (options.params.port, options.params.virtual_host) == (5673, "fedmq-test")
    assert "p%40ss" not in options.safe_url


def test_an_amqp_reconnect_calls_the_listener_off_the_io_thread_and_it_may_publish(
    root: str,
) -> None:
    require(AMQP_PORT, "RabbitMQ")
    proxy = TcpProxy(AMQP_PORT)
    transport = AmqpTransport.from_url(amqp_url(proxy.port), client_id="reconnect-test")
    try:
        inbox = Inbox()
        transport.subscribe(f"{root}/hello", inbox)
        listener = Reconnects()
        transport.on_reconnect(listener)
        # A listener that publishes, as a device checking in again does: it would
        # wait forever if it ran on the I/O thread that must send its message.
        transport.on_reconnect(lambda: transport.publish(f"{root}/hello", b"back"))

        proxy.cut()

        assert wait_until(lambda: inbox.bodies == [b"back"], timeout=30)
        assert listener.threads == ["fedmq-amqp-reconnected"]
        assert proxy.connections == 2
    finally:
        transport.close()
        proxy.close()


# -- MQTT -----------------------------------------------------------------------------


def test_an_mqtt_client_id_keyword_overrides_the_urls() -> None:
    options = MqttOptions.parse("mqtt://u:p%40ss@h:1884?client_id=from-url", client_id="kw")

    assert (options.client_id, options.persistent) == ("kw", True)
    assert (options.username, options.password) == ("u", "p@ss")
    assert options.safe_url == "mqtt://u@h:1884"


def test_the_mqtt_will_from_connect_is_published_when_the_connection_dies(
    root: str, opened: list[Transport]
) -> None:
    require(MQTT_PORT, "Mosquitto")
    observer = Inbox()
    watcher = connect(mqtt_url())
    opened.append(watcher)
    watcher.subscribe(f"{root}/checkins", observer)
    proxy = TcpProxy(MQTT_PORT)
    try:
        device = connect(
            mqtt_url(proxy.port),
            client_id=f"dev-{uuid.uuid4().hex[:6]}",
            will=(f"{root}/checkins", b"checked out"),
        )
        opened.append(device)

        proxy.cut()

        assert wait_until(lambda: observer.bodies == [b"checked out"], timeout=10)
    finally:
        proxy.close()


def test_an_mqtt_reconnect_calls_the_listener_given_to_connect(
    root: str, opened: list[Transport]
) -> None:
    require(MQTT_PORT, "Mosquitto")
    proxy = TcpProxy(MQTT_PORT)
    listener = Reconnects()
    try:
        transport = connect(
            mqtt_url(proxy.port), client_id=f"re-{uuid.uuid4().hex[:6]}", on_reconnect=listener
        )
        opened.append(transport)

        proxy.cut()

        assert wait_until(lambda: listener.threads == ["fedmq-mqtt-reconnected"], timeout=30)
    finally:
        proxy.close()
