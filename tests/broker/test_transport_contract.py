"""One suite, every transport: what FedMQ relies on from the bus."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import pytest

from broker import Delivery, MemoryTransport, Transport

Drain = Callable[[], None]


@pytest.fixture(params=["memory"])
def bus(request: pytest.FixtureRequest) -> Iterator[tuple[Transport, Drain, str]]:
    """A transport, a function that waits for in-flight messages, and a unique topic root."""
    transport = MemoryTransport()
    yield transport, lambda: transport.join(timeout=10), f"test/{uuid.uuid4().hex[:10]}"
    transport.close()


class Inbox:
    """A handler that records and settles what it receives."""

    def __init__(self, settle: str = "ack") -> None:
        self.bodies: list[bytes] = []
        self.redelivered: list[bool] = []
        self.settle = settle
        self.event = threading.Event()

    def __call__(self, delivery: Delivery) -> None:
        self.bodies.append(delivery.body)
        self.redelivered.append(delivery.redelivered)
        if self.settle == "ack":
            delivery.ack()
        elif self.settle == "requeue-once":
            if delivery.redelivered:
                delivery.ack()
            else:
                delivery.nack(requeue=True)
        elif self.settle == "dead":
            delivery.nack(requeue=False)
        self.event.set()


def test_published_messages_reach_a_subscriber_in_order(bus: tuple[Transport, Drain, str]) -> None:
    transport, drain, root = bus
    inbox = Inbox()
    transport.subscribe(f"{root}/a", inbox)

    for i in range(50):
        transport.publish(f"{root}/a", f"m{i}".encode())
    drain()

    assert inbox.bodies == [f"m{i}".encode() for i in range(50)]


def test_wildcards_match_one_segment_or_the_rest(bus: tuple[Transport, Drain, str]) -> None:
    transport, drain, root = bus
    one, rest = Inbox(), Inbox()
    transport.subscribe(f"{root}/+/x", one)
    transport.subscribe(f"{root}/#", rest)

    transport.publish(f"{root}/a/x", b"1")
    transport.publish(f"{root}/a/y", b"2")
    transport.publish(f"{root}/a/b/x", b"3")
    drain()

    assert one.bodies == [b"1"]
    assert sorted(rest.bodies) == [b"1", b"2", b"3"]


def test_group_members_share_messages_and_plain_subscribers_get_copies(
    bus: tuple[Transport, Drain, str],
) -> None:
    transport, drain, root = bus
    first, second, observer = Inbox(), Inbox(), Inbox()
    group = f"g-{uuid.uuid4().hex[:6]}"
    transport.subscribe(f"{root}/u", first, group=group)
    transport.subscribe(f"{root}/u", second, group=group)
    transport.subscribe(f"{root}/u", observer)

    for i in range(20):
        transport.publish(f"{root}/u", bytes([i]))
    drain()

    assert sorted(first.bodies + second.bodies) == [bytes([i]) for i in range(20)]
    assert len(observer.bodies) == 20


def test_a_requeued_message_comes_back_marked_redelivered(
    bus: tuple[Transport, Drain, str],
) -> None:
    transport, drain, root = bus
    inbox = Inbox("requeue-once")
    transport.subscribe(f"{root}/r", inbox, group=f"g-{uuid.uuid4().hex[:6]}")

    transport.publish(f"{root}/r", b"again")
    drain()

    assert inbox.bodies == [b"again", b"again"]
    assert inbox.redelivered == [False, True]


def test_a_group_queue_keeps_messages_published_while_no_one_consumes(
    bus: tuple[Transport, Drain, str],
) -> None:
    transport, drain, root = bus
    group = f"g-{uuid.uuid4().hex[:6]}"
    early = Inbox()
    sub = transport.subscribe(f"{root}/q", early, group=group)
    drain()
    sub.cancel()

    transport.publish(f"{root}/q", b"kept")
    late = Inbox()
    transport.subscribe(f"{root}/q", late, group=group)
    drain()

    assert early.bodies == []
    assert late.bodies == [b"kept"]


def test_large_payloads_arrive_intact(bus: tuple[Transport, Drain, str]) -> None:
    transport, drain, root = bus
    inbox = Inbox()
    transport.subscribe(f"{root}/big", inbox)
    payload = bytes(range(256)) * (4 * 1024 * 4)  # 4 MiB

    transport.publish(f"{root}/big", payload)
    drain()

    assert inbox.bodies == [payload]


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
