"""What the MQTT transport does beyond the shared contract: acks, wills, dead letters, errors."""

from __future__ import annotations

import getpass
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker import ConnectionLost, Delivery, TransportError, connect
from broker.embedded import EmbeddedBroker, find_mosquitto
from broker.mqtt import MqttTransport
from broker.transport import publish_all
from tests.broker.conftest import wait_until
from tests.brokers import MQTT_PORT, mqtt_url, require, skip_or_fail
from tests.ports import free_port
from tests.tcp_proxy import TcpProxy

Open = Callable[..., MqttTransport]


@pytest.fixture
def root() -> str:
    return f"test/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def open_mqtt() -> Iterator[Open]:
    """Open transports to the test Mosquitto (or through a given port) and close them after."""
    require(MQTT_PORT, "Mosquitto")
    opened: list[MqttTransport] = []

    def _open(
        port: int = MQTT_PORT, will: tuple[str, bytes] | None = None, **options: str
    ) -> MqttTransport:
        transport = MqttTransport(mqtt_url(port, **options), will=will)
        opened.append(transport)
        return transport

    yield _open
    for transport in reversed(opened):
        transport.close()


class Recorder:
    """A handler that keeps every delivery and settles them only when told."""

    def __init__(self, settle: str = "hold") -> None:
        self.deliveries: list[Delivery] = []
        self.threads: set[str] = set()
        self.settle = settle
        self.lock = threading.Lock()

    def __call__(self, delivery: Delivery) -> None:
        with self.lock:
            self.deliveries.append(delivery)
            self.threads.add(threading.current_thread().name)
        if self.settle == "ack":
            delivery.ack()
        elif self.settle == "dead":
            delivery.nack(requeue=False)

    @property
    def bodies(self) -> list[bytes]:
        with self.lock:
            return [d.body for d in self.deliveries]


def _with_options(url: str, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_a_consumer_receives_far_more_than_twenty_unacked_messages(
    open_mqtt: Open, root: str
) -> None:
    # Mosquitto stops at 20 in flight unless the client raises Receive Maximum,
    # and the aggregator holds a whole round's updates unacked until it commits.
    consumer = open_mqtt(client_id=f"hold-{uuid.uuid4().hex[:8]}")
    holder = Recorder("hold")
    consumer.subscribe(f"{root}/many", holder, group="g")
    publisher = open_mqtt()  # its own connection, as devices publish updates

    for i in range(100):
        publisher.publish(f"{root}/many", str(i).encode())

    assert wait_until(lambda: len(holder.deliveries) == 100, timeout=10), len(holder.deliveries)
    for delivery in holder.deliveries:
        delivery.ack()


def test_handlers_run_off_the_network_thread_in_arrival_order(open_mqtt: Open, root: str) -> None:
    transport = open_mqtt()
    inbox = Recorder("ack")
    transport.subscribe(f"{root}/order", inbox)

    for i in range(30):
        transport.publish(f"{root}/order", str(i).encode())

    assert wait_until(lambda: len(inbox.deliveries) == 30)
    assert inbox.bodies == [str(i).encode() for i in range(30)]
    assert inbox.threads == {f"fedmq-mqtt-{transport.client_id}"}


def test_the_will_is_published_when_the_connection_drops(open_mqtt: Open, root: str) -> None:
    observer = Recorder("ack")
    open_mqtt().subscribe(f"{root}/will", observer)
    proxy = TcpProxy(MQTT_PORT)
    try:
        open_mqtt(proxy.port, will=(f"{root}/will", b"gone"), client_id=f"w-{uuid.uuid4().hex[:6]}")

        proxy.cut()

        assert wait_until(lambda: observer.bodies == [b"gone"], timeout=10)
    finally:
        proxy.close()


def test_a_clean_close_does_not_publish_the_will(open_mqtt: Open, root: str) -> None:
    observer = Recorder("ack")
    open_mqtt().subscribe(f"{root}/will", observer)
    leaving = open_mqtt(will=(f"{root}/will", b"gone"))
    proxy = TcpProxy(MQTT_PORT)
    try:
        marker = f"m-{uuid.uuid4().hex[:6]}"
        open_mqtt(proxy.port, will=(f"{root}/will", b"marker"), client_id=marker)

        leaving.close()
        proxy.cut()  # a later drop: its will arrives after any the close let out

        assert wait_until(lambda: b"marker" in observer.bodies, timeout=10)
        assert observer.bodies == [b"marker"]
    finally:
        proxy.close()


def test_a_refused_message_goes_to_the_dead_letter_topic(open_mqtt: Open, root: str) -> None:
    transport = open_mqtt()
    dead = Recorder("ack")
    refuser = Recorder("dead")
    transport.subscribe(f"fedmq/dead-letters/{root}/d", dead)
    transport.subscribe(f"{root}/d", refuser)

    transport.publish(f"{root}/d", b"poison")

    assert wait_until(lambda: dead.bodies == [b"poison"])
    assert [d.topic for d in dead.deliveries] == [f"fedmq/dead-letters/{root}/d"]
    time.sleep(0.3)
    assert refuser.bodies == [b"poison"]  # acked after dead-lettering: not redelivered


def test_a_failing_handler_dead_letters_its_message(open_mqtt: Open, root: str) -> None:
    transport = open_mqtt()
    dead = Recorder("ack")
    transport.subscribe(f"fedmq/dead-letters/{root}/boom", dead)

    def explode(delivery: Delivery) -> None:
        raise RuntimeError("boom")

    transport.subscribe(f"{root}/boom", explode)
    transport.publish(f"{root}/boom", b"y")

    assert wait_until(lambda: dead.bodies == [b"y"])


def test_every_plain_subscriber_gets_a_copy_and_cancel_stops_one(
    open_mqtt: Open, root: str
) -> None:
    transport = open_mqtt()
    first, second = Recorder("ack"), Recorder("ack")
    subscription = transport.subscribe(f"{root}/fan", first)
    transport.subscribe(f"{root}/fan", second)
    transport.publish(f"{root}/fan", b"1")
    assert wait_until(lambda: first.bodies == [b"1"] and second.bodies == [b"1"])

    subscription.cancel()
    transport.publish(f"{root}/fan", b"2")

    assert wait_until(lambda: second.bodies == [b"1", b"2"])
    time.sleep(0.2)
    assert first.bodies == [b"1"]


def test_settling_twice_is_an_error(open_mqtt: Open, root: str) -> None:
    transport = open_mqtt()
    inbox = Recorder("ack")
    transport.subscribe(f"{root}/twice", inbox)
    transport.publish(f"{root}/twice", b"x")
    assert wait_until(lambda: len(inbox.deliveries) == 1)

    with pytest.raises(TransportError, match="already settled"):
        inbox.deliveries[0].ack()


def test_an_unreachable_broker_raises_connection_lost_quickly() -> None:
    port = free_port()
    started = time.monotonic()

    with pytest.raises(ConnectionLost) as caught:
        MqttTransport(f"mqtt://fedmq:s3cret@127.0.0.1:{port}?connect_timeout=1")

    assert time.monotonic() - started < 3
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_publish_gives_up_with_connection_lost_when_the_broker_stays_away() -> None:
    embedded = EmbeddedBroker().start()
    transport = MqttTransport(_with_options(embedded.url, publish_timeout="1"))
    try:
        embedded.stop()  # the port now refuses every reconnect

        started = time.monotonic()
        with pytest.raises(ConnectionLost):
            transport.publish("test/never", b"x")
        assert time.monotonic() - started < 5
    finally:
        transport.close()
        embedded.stop()


@pytest.fixture
def small_packet_broker(tmp_path: Path) -> Iterator[int]:
    """A Mosquitto child that announces a Maximum Packet Size of 2000 bytes."""
    binary = find_mosquitto()
    if binary is None:
        skip_or_fail("no mosquitto binary installed")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nuser {getpass.getuser()}\n"
        "max_packet_size 2000\n"
    )
    process = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _accepts(port), timeout=5)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=5)


def test_a_message_above_the_brokers_packet_limit_is_refused_before_sending(
    small_packet_broker: int, root: str
) -> None:
    # Sent anyway, it would get the client disconnected and resent on every reconnect.
    transport = MqttTransport(mqtt_url(small_packet_broker))
    inbox = Recorder("ack")
    try:
        transport.subscribe(f"{root}/size", inbox)

        with pytest.raises(TransportError, match="packets up to 2000 bytes"):
            transport.publish(f"{root}/size", b"x" * 5000)
        transport.publish(f"{root}/size", b"small")

        assert wait_until(lambda: inbox.bodies == [b"small"])
    finally:
        transport.close()


def test_close_is_idempotent_and_later_calls_fail_clearly(open_mqtt: Open, root: str) -> None:
    transport = open_mqtt()

    transport.close()
    transport.close()

    with pytest.raises(TransportError, match="closed"):
        transport.publish(f"{root}/x", b"x")
    with pytest.raises(TransportError, match="closed"):
        transport.subscribe(f"{root}/x", Recorder())


def test_urls_with_unknown_options_are_refused() -> None:
    with pytest.raises(TransportError, match="unknown mqtt:// option"):
        MqttTransport("mqtt://127.0.0.1:1?clientid=typo")


def test_connect_builds_an_mqtt_transport_from_its_url(open_mqtt: Open) -> None:
    client_id = f"connect-{uuid.uuid4().hex[:8]}"
    transport = connect(mqtt_url(MQTT_PORT), client_id=client_id)
    try:
        assert isinstance(transport, MqttTransport)
        assert transport.client_id == client_id
    finally:
        transport.close()


def test_mqtt_3_mode_round_trips_with_local_groups(open_mqtt: Open, root: str) -> None:
    transport = open_mqtt(protocol="3.1.1")
    first, second, plain = Recorder("ack"), Recorder("ack"), Recorder("ack")
    transport.subscribe(f"{root}/v3", first, group="g")
    transport.subscribe(f"{root}/v3", second, group="g")
    transport.subscribe(f"{root}/v3", plain)

    for i in range(4):
        transport.publish(f"{root}/v3", bytes([i]))

    assert wait_until(lambda: len(plain.bodies) == 4)
    assert wait_until(lambda: len(first.bodies) + len(second.bodies) == 4)
    assert (len(first.bodies), len(second.bodies)) == (2, 2)


def test_a_resumed_session_delivers_its_backlog_without_waiting_for_a_new_suback(
    open_mqtt: Open, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The broker sends a resumed session's backlog before the SUBACK of a new
    # subscription; waiting for it would leave the backlog parked meanwhile.
    client_id = f"resume-{uuid.uuid4().hex[:8]}"
    first = open_mqtt(client_id=client_id)
    first.subscribe(f"{root}/backlog", Recorder("ack"), group="g")
    first.close()
    publisher = open_mqtt()
    for i in range(20):
        publisher.publish(f"{root}/backlog", str(i).encode())

    resumed = open_mqtt(client_id=client_id)
    waited: list[int] = []
    monkeypatch.setattr(resumed, "_await_suback", lambda mid, *_: waited.append(mid))
    control, backlog = Recorder("ack"), Recorder("ack")
    resumed.subscribe(f"{root}/control", control)  # new to the session
    resumed.subscribe(f"{root}/backlog", backlog, group="g")

    assert waited == []
    assert wait_until(lambda: len(backlog.deliveries) == 20)
    assert backlog.bodies == [str(i).encode() for i in range(20)]
    # The new subscription is in place once the broker has worked through it.
    publisher.publish(f"{root}/control", b"after")
    assert wait_until(lambda: len(control.deliveries) == 1)


def test_a_fresh_session_still_waits_for_its_suback(
    open_mqtt: Open, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = open_mqtt(client_id=f"fresh-{uuid.uuid4().hex[:8]}")
    waited: list[int] = []
    real = transport._await_suback

    def recording(mid: int, *rest: object) -> None:
        waited.append(mid)
        real(mid, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(transport, "_await_suback", recording)
    transport.subscribe(f"{root}/fresh", Recorder("ack"))

    assert len(waited) == 1


def test_a_batch_is_sent_a_window_at_a_time_before_its_pubacks_are_awaited(
    open_mqtt: Open, root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One PUBACK round trip per task made a round of 10,000 take minutes to send.
    monkeypatch.setattr("broker.mqtt.PUBLISH_WINDOW", 16)
    transport = open_mqtt()
    assert isinstance(transport, MqttTransport)
    events: list[str] = []
    send, confirmed = transport._send, transport._confirmed

    def sending(topic: str, body: bytes, props: object) -> object:
        events.append("send")
        return send(topic, body, props)  # type: ignore[arg-type]

    def confirming(info: object, topic: str) -> bool:
        events.append("ack")
        return confirmed(info, topic)  # type: ignore[arg-type]

    monkeypatch.setattr(transport, "_send", sending)
    monkeypatch.setattr(transport, "_confirmed", confirming)

    publish_all(transport, [(f"{root}/task/{i}", b"t") for i in range(40)])

    windows = [16, 16, 8]
    assert events == [what for n in windows for what in ["send"] * n + ["ack"] * n]
