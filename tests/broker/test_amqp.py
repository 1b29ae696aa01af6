"""What the AMQP transport promises beyond the shared contract."""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest

from broker import ConnectionLost, Delivery, TransportError, connect
from broker._amqp_nodes import Nodes
from broker._amqp_options import (
    QueueType,
    parse_url,
    queue_arguments,
    routing_key,
    topic_of,
    type_argument,
)
from broker._amqp_topology import open_publisher
from broker.amqp import DEAD_LETTERS, EXCHANGE, GROUP_PREFIX, AmqpTransport
from tests.broker.conftest import wait_until
from tests.brokers import AMQP_PORT, amqp_url, require
from tests.ports import free_port
from tests.tcp_proxy import TcpProxy


class Held:
    """A handler that keeps every delivery unsettled, for the test to settle."""

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.threads: list[str] = []

    def __call__(self, delivery: Delivery) -> None:
        self.threads.append(threading.current_thread().name)
        self.deliveries.append(delivery)

    def wait(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        assert wait_until(lambda: len(self.deliveries) >= count, timeout), (
            f"expected {count} deliveries, got {len(self.deliveries)}"
        )
        return list(self.deliveries)


@pytest.fixture
def root() -> str:
    return f"test/amqp-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def admin() -> Iterator[Any]:
    """A plain pika channel to inspect the broker; group queues named in ``groups`` are deleted."""
    require(AMQP_PORT, "RabbitMQ")
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url()))
    channel = conn.channel()
    channel.groups = []
    yield channel
    cleanup = conn.channel() if not channel.is_open else channel
    for group in channel.groups:
        cleanup.queue_delete(GROUP_PREFIX + group)
    conn.close()


def _group(admin: Any) -> str:
    group = f"g-{uuid.uuid4().hex[:8]}"
    admin.groups.append(group)
    return group


def _take_dead_letters(admin: Any, bodies: set[bytes], timeout: float = 5.0) -> dict[bytes, Any]:
    """Remove ``bodies`` from the shared dead-letter queue; return their properties."""
    found: dict[bytes, Any] = {}
    end = time.monotonic() + timeout
    while set(found) != bodies and time.monotonic() < end:
        method, properties, body = admin.basic_get(DEAD_LETTERS, auto_ack=False)
        if method is None:
            time.sleep(0.05)
        elif body in bodies:
            admin.basic_ack(method.delivery_tag)
            found[body] = properties
        # Others' dead letters stay unacked here and go back when the channel closes.
    return found


def _take_broker_down(proxy: TcpProxy) -> None:
    """Drop the proxy's connections and fail every new one, as if RabbitMQ were down."""
    # TcpProxy.close() cannot be used: an accept() already in flight lets one more through.
    proxy._target = ("127.0.0.1", free_port())
    proxy.cut()


def _amqp_threads() -> set[int]:
    """Return the live AMQP transport threads (by ident: names repeat across transports)."""
    return {t.ident or 0 for t in threading.enumerate() if t.name.startswith("fedmq-amqp")}


# -- pure: no broker needed -----------------------------------------------------------


def test_topics_map_to_routing_keys_and_back() -> None:
    assert routing_key("fedmq/updates/exp-1") == "fedmq.updates.exp-1"
    assert routing_key("fedmq/+/x/#", pattern=True) == "fedmq.*.x.#"
    assert routing_key("v1.2/a") == "v1/2.a"  # '.' and '/' swap, as in RabbitMQ's MQTT plugin
    assert topic_of("v1/2.a") == "v1.2/a"
    assert topic_of(routing_key("a/b-c/d_e")) == "a/b-c/d_e"


def test_publishing_to_a_wildcard_topic_is_refused() -> None:
    with pytest.raises(TransportError, match="wildcard"):
        routing_key("a/+/b")


def test_url_options_are_split_from_pikas_and_the_password_is_hidden() -> None:
    options = parse_url("amqp://u:secret@h:5673/v?prefetch=7&publish_timeout=2.5&heartbeat=10")

    assert (options.prefetch, options.publish_timeout) == (7, 2.5)
    assert options.params.heartbeat == 10
    assert options.params.blocked_connection_timeout == 60
    assert options.params.virtual_host == "v"
    assert "secret" not in options.safe_url


def test_a_bad_url_option_raises_connection_lost_without_the_password() -> None:
    with pytest.raises(ConnectionLost, match="prefetch") as caught:
        parse_url("amqp://u:secret@h/?prefetch=many")
    assert "secret" not in str(caught.value)
    with pytest.raises(ConnectionLost, match="Unknown URL parameter"):
        parse_url("amqp://u:secret@h/?prefech=1")


def test_a_url_may_name_several_nodes_which_share_everything_but_host_and_port() -> None:
    options = parse_url(
        "amqp://u:secret@n1:5673,n2,[::1]:5675/v?heartbeat=10&prefetch=3&queue_type=quorum",
        client_id="worker-1",
    )

    assert [(a.host, a.port) for a in options.addresses] == [
        ("n1", 5673),
        ("n2", 5672),
        ("::1", 5675),
    ]
    for address in options.addresses:
        assert (address.credentials.username, address.credentials.password) == ("u", "secret")
        assert (address.virtual_host, address.heartbeat) == ("v", 10)
        assert address.client_properties == {"connection_name": "worker-1"}
    assert (options.prefetch, options.queue_type) == (3, QueueType.QUORUM)
    assert options.params is options.addresses[0]
    assert "secret" not in options.safe_url and "n1:5673,n2,[::1]:5675" in options.safe_url


def test_each_node_of_a_tls_url_verifies_its_own_host_name() -> None:
    options = parse_url("amqps://u:p@rabbit-1,rabbit-2:5671/v")

    assert [a.ssl_options.server_hostname for a in options.addresses] == ["rabbit-1", "rabbit-2"]
    assert all(a.port == 5671 for a in options.addresses)
    contexts = {id(a.ssl_options.context) for a in options.addresses}
    assert len(contexts) == 1  # one context, loaded once


def test_an_empty_node_in_a_url_is_refused() -> None:
    with pytest.raises(ConnectionLost, match="empty host") as caught:
        parse_url("amqp://u:secret@n1,,n2/v")
    assert "secret" not in str(caught.value)


def test_queue_type_is_classic_unless_the_url_asks_for_quorum() -> None:
    assert parse_url("amqp://u:p@h/v").queue_type is QueueType.CLASSIC
    assert parse_url("amqp://u:p@h/v?queue_type=classic").queue_type is QueueType.CLASSIC
    assert parse_url("amqp://u:p@h/v?queue_type=quorum").queue_type is QueueType.QUORUM
    with pytest.raises(ConnectionLost, match="queue_type must be classic or quorum") as caught:
        parse_url("amqp://u:secret@h/v?queue_type=stream")
    assert "secret" not in str(caught.value)


def test_queue_arguments_name_the_queue_type_only_for_quorum_queues() -> None:
    dead_letters = {"x-dead-letter-exchange": "fedmq.dlx"}
    expiry = {"x-expires": 600_000}
    quorum = {"x-queue-type": "quorum"}

    # Classic queues are declared exactly as before the option existed.
    assert queue_arguments(QueueType.CLASSIC, plain=False) == dead_letters
    assert queue_arguments(QueueType.CLASSIC, plain=True) == dead_letters | expiry
    assert queue_arguments(QueueType.QUORUM, plain=False) == dead_letters | quorum
    assert queue_arguments(QueueType.QUORUM, plain=True) == dead_letters | expiry | quorum
    assert (type_argument(QueueType.CLASSIC), type_argument(QueueType.QUORUM)) == ({}, quorum)


class FakeDialer:
    """Stands in for ``pika.BlockingConnection``: records each try, refuses the ports listed."""

    def __init__(self, down: set[int], refusing: frozenset[int] = frozenset()) -> None:
        self.down, self.refusing = down, refusing
        self.tried: list[int] = []

    def __call__(self, params: pika.ConnectionParameters) -> str:
        self.tried.append(params.port)
        if params.port in self.refusing:
            raise pika.exceptions.ProbableAuthenticationError("no")
        if params.port in self.down:
            raise pika.exceptions.AMQPConnectionError("refused")
        return f"connection to {params.port}"


def test_each_connect_starts_at_the_node_after_the_one_last_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = Nodes(parse_url("amqp://u:p@h:1,h:2,h:3/v").addresses)
    dialer = FakeDialer(down=set())
    monkeypatch.setattr(pika, "BlockingConnection", dialer)

    first = nodes.dial()
    dialer.down = {2}  # node 2 dies: the next connect skips to node 3
    second = nodes.dial()
    third = nodes.dial()  # after 3 comes 1 again

    assert (first, second, third) == ("connection to 1", "connection to 3", "connection to 1")
    assert dialer.tried == [1, 2, 3, 1]
    assert nodes.current == "h:1"


def test_a_connect_fails_with_the_last_error_when_no_node_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = Nodes(parse_url("amqp://u:p@h:1,h:2/v").addresses)
    monkeypatch.setattr(pika, "BlockingConnection", FakeDialer(down={1, 2}))

    with pytest.raises(pika.exceptions.AMQPConnectionError, match="refused"):
        nodes.dial()


def test_a_refused_login_is_not_tried_on_the_other_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = Nodes(parse_url("amqp://u:p@h:1,h:2/v").addresses)
    dialer = FakeDialer(down=set(), refusing=frozenset({1}))
    monkeypatch.setattr(pika, "BlockingConnection", dialer)

    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        nodes.dial()
    assert dialer.tried == [1]


class FakeChannel:
    """Records declares; declaring ``DEAD_LETTERS`` fails with 404, then with ``code``."""

    def __init__(self, calls: list[str], code: int) -> None:
        self.calls, self.code = calls, code

    def exchange_declare(self, name: str, **_: Any) -> None:
        self.calls.append(f"exchange {name}")

    def queue_declare(self, name: str, passive: bool = False, **kwargs: Any) -> None:
        self.calls.append(f"queue {name} {'passive' if passive else kwargs['arguments']}")
        raise pika.exceptions.ChannelClosedByBroker(404 if passive else self.code, "no")

    def queue_bind(self, queue: str, exchange: str) -> None:
        self.calls.append(f"bind {queue}")

    def confirm_delivery(self) -> None:
        self.calls.append("confirm")

    def close(self) -> None:
        """Nothing to release."""


class FakeConnection:
    """Hands out ``FakeChannel`` s that share one record of calls."""

    def __init__(self, code: int) -> None:
        self.calls: list[str] = []
        self.code = code

    def channel(self) -> FakeChannel:
        return FakeChannel(self.calls, self.code)


@pytest.mark.parametrize("code", [404, 403])
def test_a_client_connects_when_the_dead_letter_queue_cannot_be_declared(code: int) -> None:
    # 404: a classic queue whose node is down; 403: a user without configure right.
    connection = FakeConnection(code)

    open_publisher(connection, QueueType.QUORUM)

    assert connection.calls == [
        "exchange fedmq",
        "exchange fedmq.dlx",
        "queue fedmq.dead-letters passive",
        "queue fedmq.dead-letters {'x-queue-type': 'quorum'}",
        "confirm",
    ]


def test_other_refusals_of_the_dead_letter_queue_are_raised() -> None:
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        open_publisher(FakeConnection(406), QueueType.QUORUM)


# -- against RabbitMQ -----------------------------------------------------------------


def test_an_unreachable_broker_raises_connection_lost_quickly() -> None:
    start = time.monotonic()

    with pytest.raises(ConnectionLost, match="3 attempts") as caught:
        connect(f"amqp://guest:hunter2@127.0.0.1:{free_port()}/%2F")

    assert time.monotonic() - start < 3
    assert "hunter2" not in str(caught.value)


def test_wrong_credentials_fail_at_once() -> None:
    require(AMQP_PORT, "RabbitMQ")
    start = time.monotonic()

    with pytest.raises(ConnectionLost, match="refused the login"):
        connect(f"amqp://guest:wrong@127.0.0.1:{AMQP_PORT}/%2F")

    assert time.monotonic() - start < 3


def test_refused_and_failing_messages_land_in_the_dead_letter_queue(admin: Any, root: str) -> None:
    transport = AmqpTransport.from_url(amqp_url())
    transport.subscribe(f"{root}/dead", lambda d: d.nack(requeue=False))

    def explode(delivery: Delivery) -> None:
        raise RuntimeError("boom")

    transport.subscribe(f"{root}/boom", explode, group=_group(admin))
    refused, failed = f"{root}-x".encode(), f"{root}-y".encode()
    transport.publish(f"{root}/dead", refused)
    transport.publish(f"{root}/boom", failed)

    found = _take_dead_letters(admin, {refused, failed})
    transport.close()
    assert set(found) == {refused, failed}
    assert found[refused].headers["x-death"][0]["reason"] == "rejected"
    assert found[failed].headers["x-death"][0]["routing-keys"] == [routing_key(f"{root}/boom")]


def test_group_queues_are_durable_and_messages_persistent(admin: Any, root: str) -> None:
    group = _group(admin)
    transport = AmqpTransport.from_url(amqp_url())
    transport.subscribe(f"{root}/q", Held(), group=group).cancel()

    transport.publish(f"{root}/q", b"kept")
    transport.close()

    declared = admin.queue_declare(GROUP_PREFIX + group, passive=True)
    assert declared.method.message_count == 1
    method, properties, body = admin.basic_get(GROUP_PREFIX + group, auto_ack=True)
    assert body == b"kept"
    assert properties.delivery_mode == 2


def test_handlers_run_on_their_own_threads_so_a_slow_one_holds_up_nobody(root: str) -> None:
    require(AMQP_PORT, "RabbitMQ")
    transport = AmqpTransport.from_url(amqp_url())
    release = threading.Event()
    fast = Held()
    transport.subscribe(f"{root}/slow", lambda d: release.wait(5))
    transport.subscribe(f"{root}/fast", fast)

    transport.publish(f"{root}/slow", b"train for a while")
    transport.publish(f"{root}/fast", b"meanwhile")

    fast.wait(1, timeout=2)
    release.set()
    transport.close()
    assert fast.threads == [f"fedmq-amqp-sub:{root}/fast"]


def test_prefetch_bounds_the_unacked_messages_a_consumer_holds(root: str) -> None:
    require(AMQP_PORT, "RabbitMQ")
    transport = AmqpTransport.from_url(amqp_url() + "?prefetch=2")
    held = Held()
    transport.subscribe(f"{root}/p", held)
    for i in range(5):
        transport.publish(f"{root}/p", bytes([i]))

    first = held.wait(2)
    time.sleep(0.3)
    assert len(held.deliveries) == 2
    for delivery in first:
        delivery.ack()

    assert [d.body for d in held.wait(4)] == [bytes([i]) for i in range(4)]
    transport.close()


def test_a_message_is_settled_only_once() -> None:
    require(AMQP_PORT, "RabbitMQ")
    transport = AmqpTransport.from_url(amqp_url())
    held = Held()
    topic = f"test/amqp-{uuid.uuid4().hex[:8]}"
    transport.subscribe(topic, held)
    transport.publish(topic, b"once")
    (delivery,) = held.wait(1)

    delivery.ack()

    with pytest.raises(TransportError, match="already settled"):
        delivery.nack()
    transport.close()


def test_cancel_returns_unsettled_messages_to_the_group(admin: Any, root: str) -> None:
    group = _group(admin)
    transport = AmqpTransport.from_url(amqp_url())
    holder, taker = Held(), Held()
    subscription = transport.subscribe(f"{root}/w", holder, group=group)
    transport.publish(f"{root}/w", b"work")
    holder.wait(1)

    subscription.cancel()
    transport.subscribe(f"{root}/w", taker, group=group)

    (again,) = taker.wait(1)
    assert (again.body, again.redelivered) == (b"work", True)
    again.ack()
    transport.close()


def test_a_subscription_outlives_its_queue_being_deleted(admin: Any, root: str) -> None:
    group = _group(admin)
    transport = AmqpTransport.from_url(amqp_url())
    held = Held()
    transport.subscribe(f"{root}/d", held, group=group)

    admin.queue_delete(GROUP_PREFIX + group)  # the broker cancels the consumer

    def arrived() -> bool:
        transport.publish(f"{root}/d", b"ping")  # unroutable until the queue is back
        return bool(held.deliveries)

    assert wait_until(arrived, timeout=5)
    transport.close()


def test_a_subscription_outlives_its_channel_being_closed(admin: Any, root: str) -> None:
    group = _group(admin)
    transport = AmqpTransport.from_url(amqp_url())
    held = Held()
    subscription = transport.subscribe(f"{root}/k", held, group=group)
    io = subscription._io

    # An ack of an unknown tag makes RabbitMQ close the channel (as consumer_timeout does).
    io.call(lambda: subscription.channel.basic_ack(12345), retry=False)
    transport.publish(f"{root}/k", b"kept in the group queue")

    (delivery,) = held.wait(1, timeout=5)
    delivery.ack()
    transport.close()
    assert admin.queue_declare(GROUP_PREFIX + group, passive=True).method.message_count == 0


def test_settling_a_delivery_from_a_dropped_connection_is_harmless(admin: Any, root: str) -> None:
    group = _group(admin)
    proxy = TcpProxy(AMQP_PORT)
    transport = AmqpTransport.from_url(amqp_url(proxy.port))
    held = Held()
    transport.subscribe(f"{root}/s", held, group=group)
    transport.publish(f"{root}/s", b"work")
    (stale,) = held.wait(1)

    proxy.cut()
    copy = held.wait(2)[1]
    stale.ack()  # its channel is gone: a logged no-op, not an error
    copy.ack()

    assert (copy.body, copy.redelivered) == (b"work", True)
    transport.close()
    proxy.close()
    assert admin.queue_declare(GROUP_PREFIX + group, passive=True).method.message_count == 0


def test_a_settle_lost_with_the_connection_applies_to_the_redelivered_copy(
    admin: Any, root: str
) -> None:
    group = _group(admin)
    proxy = TcpProxy(AMQP_PORT)
    transport = AmqpTransport.from_url(amqp_url(proxy.port))
    held = Held()
    transport.subscribe(f"{root}/l", held, group=group)
    transport.publish(f"{root}/l", b"done")
    (delivery,) = held.wait(1)

    proxy.cut()
    delivery.ack()  # lost with the connection; the broker will redeliver
    transport.publish(f"{root}/l", b"after")

    held.wait(2)
    time.sleep(0.3)
    assert [d.body for d in held.deliveries] == [b"done", b"after"]
    held.deliveries[1].ack()
    transport.close()
    proxy.close()
    assert admin.queue_declare(GROUP_PREFIX + group, passive=True).method.message_count == 0


def test_publish_during_an_outage_gives_up_after_publish_timeout(root: str) -> None:
    require(AMQP_PORT, "RabbitMQ")
    proxy = TcpProxy(AMQP_PORT)
    before = _amqp_threads()
    transport = AmqpTransport.from_url(amqp_url(proxy.port) + "?publish_timeout=1&max_attempts=0")
    _take_broker_down(proxy)
    start = time.monotonic()

    with pytest.raises(ConnectionLost, match="within 1 s"):
        transport.publish(f"{root}/x", b"lost")

    assert time.monotonic() - start < 10  # bounded by publish_timeout, not hanging
    transport.close()
    proxy.close()
    assert wait_until(lambda: _amqp_threads() <= before, timeout=5)


def test_a_url_with_several_nodes_fails_over_to_the_next_when_its_node_goes(root: str) -> None:
    require(AMQP_PORT, "RabbitMQ")
    # Two proxies to the one broker stand for two nodes of a cluster.
    first, second = TcpProxy(AMQP_PORT), TcpProxy(AMQP_PORT)
    url = amqp_url(first.port).replace(f":{first.port}/", f":{first.port},127.0.0.1:{second.port}/")
    transport = AmqpTransport.from_url(url)
    try:
        held = Held()
        transport.subscribe(f"{root}/f", held)

        _take_broker_down(first)
        transport.publish(f"{root}/f", b"through the second node")

        (delivery,) = held.wait(1, timeout=10)
        assert delivery.body == b"through the second node"
        delivery.ack()
        assert (first.connections, second.connections) == (1, 1)
    finally:
        transport.close()
        first.close()
        second.close()


def test_a_nacked_publish_is_sent_again_until_the_broker_takes_it(
    admin: Any, root: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A full queue that rejects publishes nacks them, as a quorum queue between two
    # leaders does; the publish goes through once there is room again.
    caplog.set_level(logging.INFO, logger="broker.amqp")
    transport = AmqpTransport.from_url(amqp_url() + "?publish_timeout=30")  # declares fedmq
    queue = f"test.nack-{uuid.uuid4().hex[:8]}"
    admin.queue_declare(queue, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    admin.queue_bind(queue, EXCHANGE, routing_key=routing_key(f"{root}/n"))
    try:
        transport.publish(f"{root}/n", b"fills the queue")
        sent = threading.Thread(target=transport.publish, args=(f"{root}/n", b"nacked at first"))
        sent.start()
        assert wait_until(
            lambda: sum("nacked by the broker" in r.getMessage() for r in caplog.records) >= 2,
            timeout=10,
        )  # nacked, and nacked again when retried
        assert sent.is_alive()
        admin.queue_purge(queue)

        sent.join(timeout=10)
        assert not sent.is_alive()
        method, _properties, body = admin.basic_get(queue, auto_ack=True)
        assert body == b"nacked at first"
    finally:
        transport.close()
        admin.queue_delete(queue)


def test_a_publish_nacked_until_publish_timeout_raises_connection_lost(
    admin: Any, root: str
) -> None:
    transport = AmqpTransport.from_url(amqp_url() + "?publish_timeout=1")
    queue = f"test.nack-{uuid.uuid4().hex[:8]}"
    admin.queue_declare(queue, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    admin.queue_bind(queue, EXCHANGE, routing_key=routing_key(f"{root}/n"))
    try:
        start = time.monotonic()
        with pytest.raises(ConnectionLost, match="within 1 s"):
            transport.publish(f"{root}/n", b"never taken")
        assert time.monotonic() - start < 3
        transport.publish(f"{root}/other", b"the transport still works")
    finally:
        transport.close()
        admin.queue_delete(queue)


def test_after_max_attempts_every_call_raises_connection_lost(root: str) -> None:
    require(AMQP_PORT, "RabbitMQ")
    proxy = TcpProxy(AMQP_PORT)
    before = _amqp_threads()
    transport = AmqpTransport.from_url(amqp_url(proxy.port) + "?max_attempts=2")
    transport.subscribe(f"{root}/x", Held())

    _take_broker_down(proxy)

    assert wait_until(lambda: _amqp_threads() <= before, timeout=10)
    with pytest.raises(ConnectionLost, match="after 2 attempts"):
        transport.publish(f"{root}/x", b"lost")
    transport.close()
    proxy.close()


def test_close_is_idempotent_and_leaves_no_threads_behind(root: str) -> None:
    require(AMQP_PORT, "RabbitMQ")
    before = _amqp_threads()
    transport = AmqpTransport.from_url(amqp_url())
    transport.subscribe(f"{root}/a", Held())
    transport.subscribe(f"{root}/b", Held(), group=None)

    transport.close()
    transport.close()

    assert wait_until(lambda: _amqp_threads() <= before, timeout=5)
    with pytest.raises(TransportError, match="closed"):
        transport.publish(f"{root}/a", b"late")


def test_a_large_message_is_read_in_large_chunks(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pika's own 4 KiB reads copied its whole frame buffer on every one of them.
    import pika.adapters.utils.io_services_utils as pika_io

    from broker._amqp_io import RECV_BYTES

    require(AMQP_PORT, "RabbitMQ")
    asked: list[int] = []
    real = pika_io._AsyncTransportBase._sigint_safe_recv

    def recv(sock: socket.socket, max_bytes: int) -> bytes:
        asked.append(max_bytes)
        return real(sock, max_bytes)  # type: ignore[no-any-return]

    monkeypatch.setattr(pika_io._AsyncTransportBase, "_sigint_safe_recv", staticmethod(recv))
    body = bytes(range(256)) * 4096  # 1 MiB: eight frames
    transport = AmqpTransport.from_url(amqp_url())
    try:
        held = Held()
        transport.subscribe(f"{root}/big", held)
        transport.publish(f"{root}/big", body)
        (delivery,) = held.wait(1)
        assert delivery.body == body
        delivery.ack()
    finally:
        transport.close()
    assert asked and min(asked) == RECV_BYTES == 256 * 1024
