"""Broker access control on real brokers started from the configs FedMQ ships.

One private Mosquitto (``deploy/mosquitto/mosquitto.conf`` with the
dynamic-security plugin) and one private RabbitMQ node (``deploy/rabbitmq``,
management and MQTT plugins) serve the whole module; every test runs against
Mosquitto over MQTT 5, RabbitMQ over AMQP and RabbitMQ over its MQTT plugin
(3.1.1). Denied publishes are silent in MQTT 3.1.1 and a reason code in 5, so
each test asserts on what a server-side subscriber receives, after a message
that is allowed through shows that the forbidden one had its chance.
"""

from __future__ import annotations

import contextlib
import copy
import re
import secrets
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pika
import pytest

from broker import Delivery, Transport, connect
from broker._amqp_options import DEAD_LETTER_EXCHANGE, DEAD_LETTERS, EXCHANGE
from broker._mqtt_routing import DEAD_LETTER_PREFIX
from broker.access import BrokerAccess, DeviceCredentials, open_access
from broker.errors import BrokerError
from broker.topics import Topics
from fedmq.defaults import DEMO_CONFIG
from tests.brokers import skip_or_fail
from tests.e2e.owned_brokers import (
    OwnedMosquitto,
    OwnedRabbitMQ,
    owned_rabbitmq,
    shipped_rabbitmq_config,
)
from tests.e2e.processes import (
    Api,
    deployment_env,
    processes,
    rounds_when_done,
    start_fleet,
    start_service_and_worker,
    wait_until,
)
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
T = Topics("fedmq")
_DYNSEC = [
    Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so"),
    Path("/usr/lib/mosquitto_dynamic_security.so"),
    Path("/usr/local/lib/mosquitto_dynamic_security.so"),
]
_QUIET = 0.5
"""Seconds a forbidden message gets to show up after the allowed marker that followed it."""


@dataclass
class Deployment:
    """One broker as a test uses it: the access control and the client URLs without logins."""

    name: str
    access: BrokerAccess
    url: str
    log: Callable[[], str]
    admin_url: str = ""
    """The access URL the service provisions users with (FEDMQ_BROKER_ACCESS_URL)."""

    def device(self, credentials: DeviceCredentials, device_id: str) -> Transport:
        """Connect as a device (its MQTT client id is its device id)."""
        return connect(credentials.url_for(self.url), client_id=device_id)

    def server(self, credentials: DeviceCredentials) -> Transport:
        """Connect as a server-side component."""
        return connect(credentials.url_for(self.url), client_id=f"srv-{uuid.uuid4().hex[:8]}")


@dataclass
class Inbox:
    """What a subscriber received, as (topic, body); every delivery is acked."""

    got: list[tuple[str, bytes]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def __call__(self, delivery: Delivery) -> None:
        """Record and ack one delivery."""
        with self.changed:
            self.got.append((delivery.topic, delivery.body))
            self.changed.notify_all()
        delivery.ack()

    def wait_for(self, topic: str, body: bytes, timeout: float = 10.0) -> None:
        """Wait until ``(topic, body)`` arrived."""
        with self.changed:
            if not self.changed.wait_for(lambda: (topic, body) in self.got, timeout):
                raise AssertionError(f"{topic} {body!r} never arrived; got {self.got}")

    def topics(self) -> set[str]:
        """Return every topic received so far."""
        with self.changed:
            return {topic for topic, _ in self.got}


def _dynsec_plugin() -> Path | None:
    return next((path for path in _DYNSEC if path.exists()), None)


def _shipped_mosquitto(plugin: Path) -> str:
    """Return the shipped Mosquitto config as an ``OwnedMosquitto`` template, paths rewritten."""
    conf = (ROOT / "deploy/mosquitto/mosquitto.conf").read_text()
    conf = conf.replace("{", "{{").replace("}", "}}")
    for line, replacement in [
        (r"listener 1883", "listener {port} 127.0.0.1"),
        (r"plugin /\S+", f"plugin {plugin}"),
        (r"plugin_opt_config_file \S+", "plugin_opt_config_file {folder}/dynamic-security.json"),
        (r"persistence_location \S+", "persistence_location {data}/"),
    ]:
        conf, found = re.subn(rf"(?m)^{line}$", replacement, conf)
        assert found == 1, f"the shipped mosquitto.conf has no {line!r} line"
    # Running as ourselves keeps the broker able to write the test's folder.
    return conf + "\nuser {user}\n"


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    plugin, ctl = _dynsec_plugin(), shutil.which("mosquitto_ctrl")
    if plugin is None or ctl is None:
        skip_or_fail("Mosquitto's dynamic-security plugin or mosquitto_ctrl is not installed")
    assert plugin is not None and ctl is not None
    folder = tmp_path_factory.mktemp("mosquitto")
    try:
        broker = OwnedMosquitto(folder, config=_shipped_mosquitto(plugin))
    except FileNotFoundError as exc:
        skip_or_fail(str(exc))
        raise
    password = secrets.token_urlsafe(16)
    init = [str(ctl), "dynsec", "init", str(folder / "dynamic-security.json"), "admin", password]
    subprocess.run(init, check=True, capture_output=True, timeout=30)
    try:
        broker.start()
        admin_url = f"mosquitto-dynsec://admin:{password}@127.0.0.1:{broker.port}"
        access = open_access(admin_url)
        url = (
            f"mqtt://127.0.0.1:{broker.port}?session_expiry=60&connect_timeout=3&publish_timeout=1"
        )
        yield Deployment("mosquitto", access, url, broker.log, admin_url)
        access.close()
    finally:
        broker.close()


@pytest.fixture(scope="module")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OwnedRabbitMQ, str]]:
    password = secrets.token_urlsafe(16)
    plugins = ("rabbitmq_management", "rabbitmq_mqtt")
    folder = tmp_path_factory.mktemp("rabbitmq")
    with owned_rabbitmq(folder, shipped_rabbitmq_config(password), plugins) as node:
        yield node, password


def _rabbitmq_log(node: OwnedRabbitMQ) -> Callable[[], str]:
    folder = node.folder / "log"
    return lambda: node.log() + "".join(p.read_text(errors="replace") for p in folder.glob("*"))


@pytest.fixture(params=["mosquitto", "rabbitmq-amqp", "rabbitmq-mqtt"])
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    if request.param == "mosquitto":
        yield request.getfixturevalue("mosquitto")
        return
    node, password = request.getfixturevalue("rabbitmq")
    access = open_access(f"rabbitmq-http://admin:{password}@127.0.0.1:{node.management_port}/")
    if request.param == "rabbitmq-amqp":
        url = f"amqp://127.0.0.1:{node.port}/%2F?max_attempts=1&publish_timeout=1"
    else:
        url = (
            f"mqtt://127.0.0.1:{node.mqtt_port}?protocol=3.1.1&connect_timeout=3&publish_timeout=1"
        )
    yield Deployment(request.param, access, url, _rabbitmq_log(node))
    access.close()


@pytest.fixture
def opened() -> Iterator[list[Transport]]:
    """Collect the test's transports and close them at the end."""
    transports: list[Transport] = []
    yield transports
    for transport in transports:
        with contextlib.suppress(BrokerError):
            transport.close()


def _ids(count: int) -> list[str]:
    return [f"d{uuid.uuid4().hex[:10]}" for _ in range(count)]


def _server(deployment: Deployment, opened: list[Transport], *topics: str) -> Inbox:
    """Connect a server-side subscriber to ``topics``; return what it receives."""
    server = deployment.server(deployment.access.grant_server(f"s{uuid.uuid4().hex[:8]}"))
    opened.append(server)
    inbox = Inbox()
    for topic in topics:
        server.subscribe(topic, inbox)
    return inbox


def test_a_device_publishes_its_own_updates_and_reads_its_own_tasks(
    deployment: Deployment, opened: list[Transport]
) -> None:
    a, b = _ids(2)
    credentials = deployment.access.grant(a)
    deployment.access.grant(b)
    service = _server(deployment, opened, T.all_checkins, T.all_updates)
    device = deployment.device(credentials, a)
    opened.append(device)
    tasks = Inbox()
    device.subscribe(T.device(a), tasks)

    device.publish(T.checkin(a), b"hello")
    device.publish(T.updates("exp", a), b"update")
    server = deployment.server(deployment.access.grant_server("tasks"))
    opened.append(server)
    server.publish(T.device(a), b"task")

    service.wait_for(T.checkin(a), b"hello")
    service.wait_for(T.updates("exp", a), b"update")
    tasks.wait_for(T.device(a), b"task")


def test_a_device_cannot_publish_as_another(
    deployment: Deployment, opened: list[Transport]
) -> None:
    a, b = _ids(2)
    credentials = deployment.access.grant(a)
    deployment.access.grant(b)
    service = _server(deployment, opened, f"{T.namespace}/#")

    for forbidden in (T.updates("exp", b), T.checkin(b), T.control("exp"), T.device(b)):
        # Refused with a reason code (MQTT 5), a closed channel (AMQP) or a closed
        # connection (RabbitMQ's MQTT 3.1.1, after which paho resends the message on
        # every reconnect): a connection of its own for each keeps the next one clean.
        device = deployment.device(credentials, a)
        opened.append(device)
        with contextlib.suppress(BrokerError):
            device.publish(forbidden, b"forged")
        device.close()
    device = deployment.device(credentials, a)
    opened.append(device)
    device.publish(T.updates("exp", a), b"marker")
    service.wait_for(T.updates("exp", a), b"marker")
    time.sleep(_QUIET)

    assert service.topics() == {T.updates("exp", a)}


def test_a_device_cannot_read_another_devices_tasks(
    deployment: Deployment, opened: list[Transport]
) -> None:
    a, b = _ids(2)
    credentials = deployment.access.grant(a)
    deployment.access.grant(b)
    server = deployment.server(deployment.access.grant_server("tasks"))
    opened.append(server)

    # One connection per attempt, in turn: they share the device's client id, and a
    # refusal may close the connection (RabbitMQ's MQTT 3.1.1) or the channel (AMQP).
    for forbidden in (T.device(b), f"{T.namespace}/#"):
        device = deployment.device(credentials, a)
        opened.append(device)
        spied = Inbox()
        with contextlib.suppress(BrokerError):
            device.subscribe(forbidden, spied)
        server.publish(T.device(b), b"for b")
        time.sleep(_QUIET)
        device.close()
        assert spied.got == [], forbidden
    device = deployment.device(credentials, a)
    opened.append(device)
    mine = Inbox()
    device.subscribe(T.device(a), mine)
    # Under load a publish can overtake the new connection's subscription at the
    # broker and find no subscriber; a probe that arrives shows it is in place.
    _until_delivered(server, mine, T.device(a))
    server.publish(T.device(b), b"for b")
    server.publish(T.device(a), b"for a")
    mine.wait_for(T.device(a), b"for a")
    time.sleep(_QUIET)

    assert [m for m in mine.got if m[1] != _PROBE] == [(T.device(a), b"for a")]


_PROBE = b"probe"


def _until_delivered(server: Transport, inbox: Inbox, topic: str, timeout: float = 10.0) -> None:
    """Publish probes to ``topic`` until one reaches ``inbox``."""
    deadline = time.monotonic() + timeout
    while (topic, _PROBE) not in inbox.got:
        if time.monotonic() > deadline:
            raise AssertionError(f"no probe reached {topic} in {timeout:g} s")
        server.publish(topic, _PROBE)
        time.sleep(0.2)


def test_revoke_drops_the_live_connection_and_refuses_the_next(
    deployment: Deployment, opened: list[Transport]
) -> None:
    (a,) = _ids(1)
    credentials = deployment.access.grant(a)
    service = _server(deployment, opened, T.all_checkins)
    device = deployment.device(credentials, a)
    opened.append(device)
    device.publish(T.checkin(a), b"before")
    service.wait_for(T.checkin(a), b"before")

    started = time.monotonic()
    deployment.access.revoke(a)
    revoked_in = time.monotonic() - started

    # The connection was open and allowed; only being dropped can stop this publish.
    with pytest.raises(BrokerError):
        device.publish(T.checkin(a), b"after")
    with pytest.raises(BrokerError):
        opened.append(deployment.device(credentials, a))
    time.sleep(_QUIET)
    assert (T.checkin(a), b"after") not in service.got
    assert revoked_in < 5


def test_anonymous_and_wrong_logins_are_refused(deployment: Deployment) -> None:
    (a,) = _ids(1)
    deployment.access.grant(a)

    with pytest.raises(BrokerError):
        connect(deployment.url, client_id=a).close()
    with pytest.raises(BrokerError):
        connect(DeviceCredentials(f"fedmq.{a}", "wrong").url_for(deployment.url), client_id=a)


def test_a_new_grant_replaces_the_secret(deployment: Deployment, opened: list[Transport]) -> None:
    (a,) = _ids(1)
    first = deployment.access.grant(a)
    second = deployment.access.grant(a)

    opened.append(deployment.device(second, a))
    with pytest.raises(BrokerError):
        opened.append(deployment.device(first, a))
    assert first.password != second.password
    assert first.password not in deployment.log() and second.password not in deployment.log()


def test_the_server_role_does_what_the_service_and_a_worker_do(
    deployment: Deployment, opened: list[Transport]
) -> None:
    (a,) = _ids(1)
    # The servers first: on AMQP they declare the topology a device's connection checks.
    service = deployment.server(deployment.access.grant_server("service"))
    worker = deployment.server(deployment.access.grant_server("worker"))
    device = deployment.device(deployment.access.grant(a), a)
    opened.extend([device, service, worker])
    at_service, at_worker, updates, tasks = Inbox(), Inbox(), Inbox(), Inbox()
    device.subscribe(T.device(a), tasks)
    service.subscribe(T.all_checkins, at_service)
    service.subscribe(T.all_events, at_service)
    worker.subscribe(T.all_control, at_worker)
    dead = f"{DEAD_LETTER_PREFIX}/{T.namespace}/#"
    mqtt = deployment.url.startswith("mqtt")
    if mqtt:  # AMQP dead-letters inside the broker, to a queue, not a topic
        service.subscribe(dead, at_service)

    def refuse(delivery: Delivery) -> None:
        updates(delivery) if delivery.body == b"good" else delivery.nack(requeue=False)

    worker.subscribe(T.all_updates, refuse, group=T.updates_group)
    device.publish(T.checkin(a), b"hello")
    service.publish(T.control("exp"), b"round 1")
    device.publish(T.updates("exp", a), b"good")
    device.publish(T.updates("exp", a), b"bad")
    worker.publish(T.events("exp"), b"committed")
    _until_delivered(service, tasks, T.device(a))  # the service sends a device its tasks

    at_service.wait_for(T.checkin(a), b"hello")
    at_worker.wait_for(T.control("exp"), b"round 1")
    updates.wait_for(T.updates("exp", a), b"good")
    at_service.wait_for(T.events("exp"), b"committed")
    if mqtt:
        at_service.wait_for(f"{DEAD_LETTER_PREFIX}/{T.updates('exp', a)}", b"bad")


# Exchanges and queues are AMQP's: MQTT clients cannot name them.
@pytest.mark.parametrize("deployment", ["rabbitmq-amqp"], indirect=True)
def test_a_device_on_amqp_cannot_delete_the_shared_topology(
    deployment: Deployment, opened: list[Transport]
) -> None:
    (a,) = _ids(1)
    credentials = deployment.access.grant(a)
    service = _server(deployment, opened, T.all_checkins)
    device = deployment.device(credentials, a)  # it connects, checking the topology passively
    opened.append(device)
    # FedMQ's own URL options are not pika's.
    login = pika.URLParameters(credentials.url_for(deployment.url).partition("?")[0])

    refused = []
    for delete in (
        lambda ch: ch.exchange_delete(EXCHANGE),
        lambda ch: ch.exchange_delete(DEAD_LETTER_EXCHANGE),
        lambda ch: ch.queue_delete(DEAD_LETTERS),
        lambda ch: ch.exchange_declare(EXCHANGE, exchange_type="fanout"),
    ):
        connection = pika.BlockingConnection(login)
        try:
            delete(connection.channel())
        except pika.exceptions.ChannelClosedByBroker as exc:
            refused.append(exc.reply_code)
        finally:
            with contextlib.suppress(pika.exceptions.AMQPError):
                connection.close()
    device.publish(T.checkin(a), b"still routed")

    assert refused == [403] * 4
    service.wait_for(T.checkin(a), b"still routed")


def test_a_deployment_whose_devices_each_log_in_as_themselves(
    mosquitto: Deployment, tmp_path: Path
) -> None:
    """Server, worker and fleet as processes; the service provisions every device's login.

    The shipped Mosquitto refuses anonymous clients, so the fleet's devices
    connect only because each uses the broker user its registration answer
    carried; the server and the worker log in with server-side users.
    """
    config = copy.deepcopy(DEMO_CONFIG)
    config["rounds"]["count"] = 2
    config["training"]["epochs"] = 1
    # A namespace of its own: the module's other tests leave server sessions behind
    # (60 s expiry) in the default one's worker group, which would share its updates.
    namespace = f"acl{uuid.uuid4().hex[:8]}"
    admin_url = f"{mosquitto.admin_url}?namespace={namespace}"
    access = open_access(admin_url)
    plain = mosquitto.url
    service = access.grant_server("service").url_for(plain)
    worker = access.grant_server("worker").url_for(plain)
    access.close()
    port = free_port()
    env = deployment_env(
        tmp_path,
        service,
        port,
        f"{namespace}-aggregators",
        FEDMQ_BROKER_ACCESS_URL=admin_url,
        FEDMQ_NAMESPACE=namespace,
    )
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group:
        start_service_and_worker(group, api, port, f"{namespace}-worker", "--broker", worker)
        experiment_id = api.call("POST", "/experiments", config)["id"]
        start_fleet(group, api, experiment_id, "--prefix", "acl", "--broker", plain)
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": 2})
        rounds = wait_until(lambda: rounds_when_done(api, experiment_id, 2), 120, "rounds", group)
        api.call("DELETE", "/devices/acl-0000")
        kept = _dynsec_client(mosquitto, f"{namespace}.acl-0001")
        gone = _dynsec_client(mosquitto, f"{namespace}.acl-0000")

    assert [r["state"] for r in rounds] == ["committed"] * 2, group.logs()
    # Anonymous clients are refused here, so every device connected with its own login.
    assert all(r["accepted"] == 20 for r in rounds)
    assert f"{namespace}.acl-0001" in kept and "not found" not in kept.lower()
    assert "not found" in gone.lower(), f"the revoked device's broker user is still there: {gone}"


def _dynsec_client(deployment: Deployment, username: str) -> str:
    """Return what Mosquitto's own admin tool says of a broker user."""
    admin = urlsplit(deployment.admin_url)
    command = [
        "mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(admin.port), "-u", "admin",
        "-P", str(admin.password), "dynsec", "getClient", username,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    return done.stdout + done.stderr
