"""The MQTT hub: hundreds of clients on one network thread, against the real Mosquitto."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from broker import ConnectionLost, Delivery, TransportError
from broker._mqtt_hub_lanes import Lanes
from broker.mqtt import MqttTransport
from broker.mqtt_hub import HubClient, HubPool, MqttHub
from tests.broker.conftest import wait_until
from tests.brokers import MQTT_PORT, mqtt_url, require
from tests.ports import free_port
from tests.tcp_proxy import TcpProxy

N = 200


@pytest.fixture
def root() -> str:
    return f"test/hub-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def hub() -> Iterator[MqttHub]:
    require(MQTT_PORT, "Mosquitto")
    hub = MqttHub(name="test-hub", workers=2)
    yield hub
    hub.close()


class Inbox:
    """Acks and keeps what it gets, with the threads that handled it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, delivery: Delivery) -> None:
        delivery.ack()
        with self.lock:
            self.bodies.append(delivery.body)
            self.threads.add(threading.current_thread().name)

    def count(self) -> int:
        with self.lock:
            return len(self.bodies)


def _ids(root: str, n: int) -> list[str]:
    return [f"{root.replace('/', '-')}-{i}" for i in range(n)]


def _hub_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("test-hub")}


def test_hundreds_of_clients_exchange_qos1_messages_on_a_few_threads(
    hub: MqttHub, root: str
) -> None:
    clients = [hub.open(mqtt_url(), client_id=cid) for cid in _ids(root, N)]
    inboxes = [Inbox() for _ in clients]
    assert hub.wait_connected(timeout=30) == 0

    for i, client in enumerate(clients):
        client.subscribe(f"{root}/dev/{i}", inboxes[i])
    for i, client in enumerate(clients):  # each one to its neighbour
        client.publish(f"{root}/dev/{(i + 1) % N}", f"from {i}".encode())

    assert wait_until(lambda: all(inbox.count() == 1 for inbox in inboxes), timeout=20)
    assert [inbox.bodies for inbox in inboxes] == [
        [f"from {(i - 1) % N}".encode()] for i in range(N)
    ]
    # one network thread, two connectors, two lane workers: not two threads a client
    assert len(_hub_threads()) == 5
    assert all(name.startswith("test-hub-lane") for inbox in inboxes for name in inbox.threads)


def test_a_handler_may_publish_and_wait_for_its_puback_on_a_single_worker(root: str) -> None:
    require(MQTT_PORT, "Mosquitto")
    hub = MqttHub(name="test-hub", workers=1)
    try:
        replies = Inbox()
        listener = hub.open(mqtt_url())
        listener.subscribe(f"{root}/reply/+", replies)
        devices = [hub.open(mqtt_url(), client_id=cid) for cid in _ids(root, 20)]
        for i, device in enumerate(devices):
            # What a device does with a task: publish its update from the handler.
            def answer(delivery: Delivery, me: HubClient = device, i: int = i) -> None:
                me.publish(f"{root}/reply/{i}", delivery.body)
                delivery.ack()

            device.subscribe(f"{root}/task/{i}", answer)

        for i in range(len(devices)):
            listener.publish(f"{root}/task/{i}", f"task {i}".encode())

        assert wait_until(lambda: replies.count() == len(devices), timeout=20)
    finally:
        hub.close()


def test_each_clients_messages_are_handled_in_arrival_order(hub: MqttHub, root: str) -> None:
    consumers = [hub.open(mqtt_url()) for _ in range(5)]
    inboxes = [Inbox() for _ in consumers]
    for consumer, inbox in zip(consumers, inboxes, strict=True):
        consumer.subscribe(f"{root}/seq", inbox)
    publisher = hub.open(mqtt_url())

    for i in range(100):
        publisher.publish(f"{root}/seq", str(i).encode())

    expected = [str(i).encode() for i in range(100)]
    assert wait_until(lambda: all(inbox.count() == 100 for inbox in inboxes), timeout=20)
    assert all(inbox.bodies == expected for inbox in inboxes)


def test_clients_that_vanish_get_their_wills_published_and_come_back(
    hub: MqttHub, root: str
) -> None:
    wills = Inbox()
    observer = hub.open(mqtt_url())
    observer.subscribe(f"{root}/will/+", wills)
    ids = _ids(root, 50)
    clients = [
        hub.open(mqtt_url(), client_id=cid, will=(f"{root}/will/{cid}", b"gone")) for cid in ids
    ]
    back = Inbox()
    for client in clients:
        client.on_reconnect(lambda c=client: c.publish(f"{root}/back", c.client_id.encode()))
    observer.subscribe(f"{root}/back", back)
    assert hub.wait_connected(timeout=20) == 0

    for client in clients:
        client.abort()  # no DISCONNECT: as if the device crashed

    assert wait_until(lambda: wills.count() == len(ids), timeout=20)
    assert wait_until(lambda: back.count() == len(ids), timeout=20)
    assert sorted(back.bodies) == sorted(cid.encode() for cid in ids)


def test_a_clean_close_publishes_no_will(hub: MqttHub, root: str) -> None:
    wills = Inbox()
    hub.open(mqtt_url()).subscribe(f"{root}/will", wills)
    clients = [
        hub.open(mqtt_url(), client_id=cid, will=(f"{root}/will", b"x")) for cid in _ids(root, 20)
    ]
    assert hub.wait_connected(timeout=20) == 0

    marker = hub.open(mqtt_url(), client_id=f"{_ids(root, 1)[0]}-m", will=(f"{root}/will", b"m"))
    assert hub.wait_connected(timeout=20) == 0

    for client in clients:
        client.close()
    marker.abort()  # a later drop: its will arrives after any the closes let out

    assert wait_until(lambda: wills.count() >= 1, timeout=20)
    assert wills.bodies == [b"m"]
    marker.close()  # it came back after the abort
    assert wait_until(lambda: hub.clients == 1, timeout=10)


def test_clients_reconnect_and_resubscribe_after_the_broker_drops_them(
    hub: MqttHub, root: str
) -> None:
    proxy = TcpProxy(MQTT_PORT)
    try:
        ids = _ids(root, 100)
        clients = [hub.open(mqtt_url(proxy.port), client_id=cid) for cid in ids]
        inboxes = [Inbox() for _ in clients]
        for i, client in enumerate(clients):
            client.subscribe(f"{root}/dev/{i}", inboxes[i])
        sender = hub.open(mqtt_url())

        proxy.cut()
        for i in range(len(clients)):  # waits for nobody: the sender's connection is direct
            sender.publish(f"{root}/dev/{i}", b"after the cut")

        assert wait_until(lambda: all(inbox.count() >= 1 for inbox in inboxes), timeout=30)
        assert proxy.connections >= 2 * len(clients)
    finally:
        proxy.close()


def test_a_client_taken_over_by_its_own_id_reconnects(hub: MqttHub, root: str) -> None:
    cid = _ids(root, 1)[0]
    client = hub.open(mqtt_url(), client_id=cid)
    inbox = Inbox()
    client.subscribe(f"{root}/mine", inbox)
    reconnected = threading.Event()
    client.on_reconnect(reconnected.set)

    MqttTransport(mqtt_url(), client_id=cid).close()  # the broker drops the hub's connection

    assert reconnected.wait(timeout=15)
    client.publish(f"{root}/mine", b"still here")
    assert wait_until(lambda: inbox.bodies == [b"still here"], timeout=10)


def test_an_unreachable_broker_fails_the_first_publish_with_connection_lost(
    hub: MqttHub,
) -> None:
    port = free_port()
    client = hub.open(f"mqtt://fedmq:s3cret@127.0.0.1:{port}?connect_timeout=1")
    started = time.monotonic()

    with pytest.raises(ConnectionLost) as caught:
        client.publish("test/never", b"x")

    assert time.monotonic() - started < 4
    assert "s3cret" not in str(caught.value)
    assert wait_until(lambda: hub.clients == 0, timeout=5)


def test_a_client_beyond_the_open_files_limit_is_refused_clearly(hub: MqttHub) -> None:
    hub._capacity = hub.clients + 1
    hub.open(mqtt_url())

    with pytest.raises(TransportError, match="open files"):
        hub.open(mqtt_url())


def test_the_hub_raises_the_soft_open_files_limit_to_the_hard_one() -> None:
    script = (
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "from broker.mqtt_hub import MqttHub\n"
        "hub = MqttHub()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard), hub.capacity > 256)\n"
        "hub.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "True"], out.stderr


def test_a_pool_opens_mqtt_clients_on_one_hub_with_their_logins(root: str) -> None:
    require(MQTT_PORT, "Mosquitto")

    class Login:
        def url_for(self, url: str) -> str:
            return url.replace("mqtt://", "mqtt://someone:pw@")

    pool = HubPool(mqtt_url(), session_expiry_s=30, name="test-hub")
    try:
        first = pool("a-" + root.replace("/", "-"), None, Login())
        second = pool("b-" + root.replace("/", "-"))
        assert isinstance(first, HubClient) and isinstance(second, HubClient)
        assert first.url == "mqtt://someone@127.0.0.1:1883"
        assert first._options.session_expiry == 30
        inbox = Inbox()
        second.subscribe(f"{root}/p", inbox)
        first.publish(f"{root}/p", b"x")
        assert wait_until(lambda: inbox.bodies == [b"x"])
    finally:
        pool.close()
    assert pool.hub is not None and pool.hub.clients == 0


def test_lanes_keep_each_lanes_order_and_run_lanes_side_by_side() -> None:
    pool = Lanes(3, "test-lanes")
    try:
        seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
        gate = threading.Event()
        lanes = [pool.lane() for _ in range(3)]
        lanes[0].submit(lambda: gate.wait(5))  # lane 0 blocks; the others go on
        for job in range(50):
            for index, lane in enumerate(lanes):
                lane.submit(lambda i=index, j=job: seen[i].append(j))

        assert wait_until(lambda: len(seen[1]) == 50 and len(seen[2]) == 50, timeout=5)
        assert seen[0] == []
        gate.set()
        assert wait_until(lambda: len(seen[0]) == 50, timeout=5)
        assert all(jobs == list(range(50)) for jobs in seen.values())
    finally:
        pool.stop()


def test_a_closed_lane_drops_its_queued_jobs() -> None:
    pool = Lanes(1, "test-lanes")
    try:
        lane, ran = pool.lane(), []
        started, gate = threading.Event(), threading.Event()
        lane.submit(lambda: (started.set(), gate.wait(5)))
        lane.submit(lambda: ran.append("queued"))
        assert started.wait(5)

        threading.Timer(0.1, gate.set).start()
        lane.close()  # waits for the running job, drops the queued one
        lane.submit(lambda: ran.append("late"))
        time.sleep(0.1)

        assert ran == []
    finally:
        pool.stop()
