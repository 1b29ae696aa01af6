"""One suite, every transport: what FedMQ relies on from the bus."""

from __future__ import annotations

import threading
import time
import uuid

from broker import Delivery, MemoryTransport
from broker.transport import publish_all
from tests.broker.conftest import Bus, wait_until


class Inbox:
    """A handler that records and settles what it receives."""

    def __init__(self, settle: str = "ack") -> None:
        self.bodies: list[bytes] = []
        self.redelivered: list[bool] = []
        self.settle = settle
        self.lock = threading.Lock()

    def __call__(self, delivery: Delivery) -> None:
        self._settle(delivery)
        # Recorded after settling, so a test that acts on what arrived never
        # races the settlement of it.
        with self.lock:
            self.bodies.append(delivery.body)
            self.redelivered.append(delivery.redelivered)

    def _settle(self, delivery: Delivery) -> None:
        if self.settle == "ack":
            delivery.ack()
        elif self.settle == "requeue-once":
            if delivery.redelivered:
                delivery.ack()
            else:
                delivery.nack(requeue=True)
        elif self.settle == "dead":
            delivery.nack(requeue=False)
        # "hold": never settle, as a consumer that dies mid-message

    def wait(self, count: int, timeout: float = 10.0) -> list[bytes]:
        assert wait_until(lambda: len(self.bodies) >= count, timeout), (
            f"expected {count} messages, got {len(self.bodies)}"
        )
        return list(self.bodies)


def _settle_time(bus: Bus) -> None:
    """Give a real broker a moment to (not) deliver extra messages."""
    if bus.kind != "memory":
        time.sleep(0.3)


def test_published_messages_reach_a_subscriber_in_order(bus: Bus) -> None:
    transport = bus.connect()
    inbox = Inbox()
    transport.subscribe(f"{bus.root}/a", inbox)

    for i in range(50):
        transport.publish(f"{bus.root}/a", f"m{i}".encode())

    assert inbox.wait(50) == [f"m{i}".encode() for i in range(50)]


def test_a_batch_reaches_each_subscriber_in_order(bus: Bus) -> None:
    # A round's tasks go out with publish_all: all in flight at once over MQTT.
    transport = bus.connect()
    inboxes = [Inbox() for _ in range(3)]
    for i, inbox in enumerate(inboxes):
        transport.subscribe(f"{bus.root}/d{i}", inbox)
    batch = [(f"{bus.root}/d{i % 3}", f"m{i}".encode()) for i in range(300)]

    publish_all(transport, batch)

    for i, inbox in enumerate(inboxes):
        assert inbox.wait(100) == [body for topic, body in batch if topic.endswith(f"/d{i}")]


def test_wildcards_match_one_segment_or_the_rest(bus: Bus) -> None:
    transport = bus.connect()
    one, rest = Inbox(), Inbox()
    transport.subscribe(f"{bus.root}/+/x", one)
    transport.subscribe(f"{bus.root}/#", rest)

    transport.publish(f"{bus.root}/a/x", b"1")
    transport.publish(f"{bus.root}/a/y", b"2")
    transport.publish(f"{bus.root}/a/b/x", b"3")

    assert sorted(rest.wait(3)) == [b"1", b"2", b"3"]
    _settle_time(bus)
    assert one.bodies == [b"1"]


def test_group_members_share_messages_and_plain_subscribers_get_copies(bus: Bus) -> None:
    transport = bus.connect()
    first, second, observer = Inbox(), Inbox(), Inbox()
    group = bus.group()
    transport.subscribe(f"{bus.root}/u", first, group=group)
    transport.subscribe(f"{bus.root}/u", second, group=group)
    transport.subscribe(f"{bus.root}/u", observer)

    for i in range(20):
        transport.publish(f"{bus.root}/u", bytes([i]))

    assert len(observer.wait(20)) == 20
    assert wait_until(lambda: len(first.bodies) + len(second.bodies) >= 20)
    _settle_time(bus)
    assert sorted(first.bodies + second.bodies) == [bytes([i]) for i in range(20)]


def test_a_requeued_message_comes_back_marked_redelivered(bus: Bus) -> None:
    transport = bus.connect()
    inbox = Inbox("requeue-once")
    transport.subscribe(f"{bus.root}/r", inbox, group=bus.group())

    transport.publish(f"{bus.root}/r", b"again")

    assert inbox.wait(2) == [b"again", b"again"]
    assert inbox.redelivered == [False, True]


def test_an_unsettled_message_is_redelivered_to_the_next_consumer(network_bus: Bus) -> None:
    bus = network_bus
    group = bus.group()
    first = bus.connect()
    holder = Inbox("hold")
    first.subscribe(f"{bus.root}/w", holder, group=group)
    first.publish(f"{bus.root}/w", b"work")
    holder.wait(1)

    first.close()  # dies without acking
    second = bus.connect()
    taker = Inbox()
    second.subscribe(f"{bus.root}/w", taker, group=group)

    assert taker.wait(1, timeout=15) == [b"work"]
    assert taker.redelivered == [True]


def test_a_group_keeps_messages_published_while_its_consumer_is_offline(network_bus: Bus) -> None:
    bus = network_bus
    group = bus.group()
    first = bus.connect()
    first.subscribe(f"{bus.root}/q", Inbox(), group=group)
    first.close()

    publisher = bus.connect() if bus.kind == "amqp" else _other_client(bus)
    publisher.publish(f"{bus.root}/q", b"kept")
    second = bus.connect()
    late = Inbox()
    second.subscribe(f"{bus.root}/q", late, group=group)

    assert late.wait(1, timeout=15) == [b"kept"]


def _other_client(bus: Bus) -> object:
    """An MQTT publisher with its own client id (the group's id is offline)."""
    from broker import connect
    from tests.brokers import mqtt_url

    assert bus.proxy is not None
    transport = connect(mqtt_url(bus.proxy.port, client_id=f"pub-{uuid.uuid4().hex[:6]}"))
    bus.opened.append(transport)
    return transport


def test_the_transport_reconnects_after_the_broker_drops_it(network_bus: Bus) -> None:
    bus = network_bus
    transport = bus.connect()
    inbox = Inbox()
    transport.subscribe(f"{bus.root}/c", inbox, group=bus.group())
    transport.publish(f"{bus.root}/c", b"before")
    inbox.wait(1)

    assert bus.proxy is not None
    bus.proxy.cut()
    transport.publish(f"{bus.root}/c", b"after")  # blocks until reconnected, then confirms

    assert inbox.wait(2, timeout=30) == [b"before", b"after"]
    assert bus.proxy.connections >= 2


def test_reconnect_listeners_run_after_a_drop_and_may_publish(network_bus: Bus) -> None:
    bus = network_bus
    transport = bus.connect()
    inbox = Inbox()
    transport.subscribe(f"{bus.root}/back", inbox, group=bus.group())
    # What a device does: check in again, since the broker may have sent its will.
    transport.on_reconnect(lambda: transport.publish(f"{bus.root}/back", b"checked in"))

    assert bus.proxy is not None
    bus.proxy.cut()

    assert inbox.wait(1, timeout=30) == [b"checked in"]


def test_large_payloads_arrive_intact(bus: Bus) -> None:
    transport = bus.connect()
    inbox = Inbox()
    transport.subscribe(f"{bus.root}/big", inbox)
    payload = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB

    transport.publish(f"{bus.root}/big", payload)

    assert inbox.wait(1, timeout=30) == [payload]


def test_memory_dead_letters_refused_messages_and_failing_handlers() -> None:
    transport = MemoryTransport()
    transport.subscribe("t/dead", Inbox("dead"))

    def explode(delivery: Delivery) -> None:
        raise RuntimeError("boom")

    transport.subscribe("t/boom", explode)
    transport.publish("t/dead", b"x")
    transport.publish("t/boom", b"y")
    transport.join(timeout=5)

    assert transport.dead_letters == [("t/dead", b"x"), ("t/boom", b"y")]
    transport.close()
