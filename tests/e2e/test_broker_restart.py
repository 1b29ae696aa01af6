"""A broker restarted mid-round: every process reconnects, nothing is lost or counted twice.

Each broker here is the module's own (``tests/e2e/owned_brokers.py``), so its
restarts disturb no other test. A restart is graceful, an operator's restart:
Mosquitto saves its sessions and queued messages on SIGTERM, and RabbitMQ
keeps durable queues and persistent messages across its SIGTERM shutdown (what
``rabbitmqctl stop`` does). RabbitMQ is also killed outright (SIGKILL): it
keeps what it confirmed. Mosquitto is not: killed, it loses what it PUBACKed
since its last autosave, by design.

The first two tests pin down, one transport at a time, what a restart used to
lose; the last runs real ``fedmq server``, ``fedmq worker`` and ``fedmq fleet``
processes through one.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load

from aggregator_service import ExperimentConfig
from broker import Delivery, Transport, connect
from fedmq.compose import simulate
from fedmq.defaults import DEMO_CONFIG
from tests.brokers import amqp_url, mqtt_url
from tests.e2e.owned_brokers import OwnedMosquitto, OwnedRabbitMQ, owned_mosquitto, owned_rabbitmq
from tests.e2e.processes import (
    SEED,
    Api,
    deployment_env,
    max_difference,
    processes,
    rounds_when_done,
    start_fleet,
    start_worker,
    wait_healthy,
    wait_until,
)
from tests.ports import free_port
from tests.tcp_proxy import TcpProxy

ROUNDS = 3
# The demo's 5 epochs train a device in ~10 ms and a round in ~0.3 s, too short to
# take the broker down inside; 60 make a round last a few seconds.
EPOCHS = 60


@pytest.fixture(scope="module")
def amqp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnedRabbitMQ]:
    with owned_rabbitmq(tmp_path_factory.mktemp("rabbitmq")) as broker:
        yield broker


@pytest.fixture(scope="module")
def mqtt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnedMosquitto]:
    with owned_mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    """The uninterrupted run's final model, simulated in-process once for both brokers."""
    return load(simulate(ExperimentConfig.from_dict(_config())).final_weights)


class Inbox:
    """A handler that acks and keeps every body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def __call__(self, delivery: Delivery) -> None:
        self.bodies.append(delivery.body)
        delivery.ack()

    def wait(self, count: int, timeout: float) -> list[bytes]:
        end = time.monotonic() + timeout
        while len(self.bodies) < count and time.monotonic() < end:
            time.sleep(0.05)
        return self.bodies

    def wait_for(self, body: bytes, timeout: float) -> list[bytes]:
        """Wait until ``body`` has come; return every body so far."""
        end = time.monotonic() + timeout
        while body not in self.bodies and time.monotonic() < end:
            time.sleep(0.05)
        return self.bodies


@pytest.fixture
def proxy_to() -> Iterator[Any]:
    """Return a factory of TCP proxies to a port; hold one shut to keep a client away."""
    opened: list[TcpProxy] = []

    def make(port: int) -> TcpProxy:
        opened.append(TcpProxy(port))
        return opened[-1]

    yield make
    for proxy in opened:
        proxy.close()


def _hold_shut(proxy: TcpProxy) -> tuple[str, int]:
    """Refuse the proxy's new connections (to a port nobody listens on); return its target."""
    target = proxy._target
    proxy._target = ("127.0.0.1", free_port())
    return target


def test_a_plain_amqp_subscriber_gets_what_was_published_while_the_broker_restarted(
    amqp: OwnedRabbitMQ, proxy_to: Any
) -> None:
    # The subscriber comes through a proxy that stays shut until the message is
    # sent: its queue, not its reconnect, must keep the message.
    proxy = proxy_to(amqp.port)
    subscriber = connect(amqp_url(proxy.port) + "?max_attempts=0")
    publisher: Transport | None = None
    try:
        inbox = Inbox()
        subscriber.subscribe("restart/plain", inbox)
        target = _hold_shut(proxy)
        amqp.stop()
        amqp.start()
        publisher = connect(amqp.url)
        publisher.publish("restart/plain", b"sent while the subscriber was away")
        proxy._target = target

        assert inbox.wait(1, timeout=60) == [b"sent while the subscriber was away"]
    finally:
        subscriber.close()
        if publisher is not None:
            publisher.close()


def test_an_mqtt_group_gets_what_was_published_before_its_member_subscribed_again(
    mqtt: OwnedMosquitto, proxy_to: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Mosquitto 2.0 restores a persistent session's plain subscriptions after a
    # restart but not its shared ones: until the member is back, a publish to the
    # group matches nobody, and the publisher, which found a subscriber there
    # before, has to send it again.
    proxy = proxy_to(mqtt.port)
    tag = uuid.uuid4().hex[:8]
    member = connect(mqtt_url(proxy.port, client_id=f"member-{tag}"))
    publisher = connect(mqtt_url(mqtt.port, client_id=f"publisher-{tag}"))
    try:
        inbox = Inbox()
        member.subscribe("restart/group", inbox, group=f"g-{tag}")
        publisher.publish("restart/group", b"before")
        inbox.wait(1, timeout=10)
        target = _hold_shut(proxy)
        mqtt.stop()
        mqtt.start()
        sent = threading.Thread(
            target=publisher.publish, args=("restart/group", b"sent before the member was back")
        )
        with caplog.at_level(logging.INFO, logger="broker.mqtt"):
            sent.start()
            # The publisher is back, finds no subscription and will publish again.
            assert _logged(caplog, "nobody subscribes to restart/group yet", timeout=30)
        proxy._target = target
        sent.join(timeout=30)

        bodies = inbox.wait_for(b"sent before the member was back", timeout=30)
        # QoS 1 is at least once: a stop that overtakes the member's PUBACK makes
        # Mosquitto send "before" again (FedMQ's receivers drop it by message id).
        assert list(dict.fromkeys(bodies)) == [b"before", b"sent before the member was back"]
    finally:
        member.close()
        publisher.close()


@pytest.mark.parametrize(
    ("broker", "graceful"),
    [("amqp", True), ("mqtt", True), ("amqp", False)],
    ids=["amqp", "mqtt", "amqp-killed"],
)
def test_a_broker_restarted_mid_round_loses_and_doubles_no_update(
    tmp_path: Path,
    broker: str,
    graceful: bool,
    expected: dict[str, Any],
    request: pytest.FixtureRequest,
) -> None:
    owned: OwnedRabbitMQ | OwnedMosquitto = request.getfixturevalue(broker)
    raw = _config()
    port = free_port()
    group = f"restart-{uuid.uuid4().hex[:8]}"
    env = deployment_env(tmp_path, owned.url, port, group)
    api = Api(env["FEDMQ_SERVER_URL"])
    with processes(tmp_path, env) as group_of:
        group_of.start("server", "server", "--port", str(port))
        wait_healthy(group_of, api)
        start_worker(group_of, "worker", f"w-{group}", "--checkpoint-every", "5")
        experiment_id = api.call("POST", "/experiments", raw)["id"]
        # One training at a time, so round 2 lasts long enough to restart the broker in.
        start_fleet(group_of, api, experiment_id, "--concurrency", "1", "--prefix", group)
        api.call("POST", f"/experiments/{experiment_id}/rounds", {"count": ROUNDS})

        # Round 2's first checkpoint: 5 updates folded and acked, more folded and
        # unacked, the rest still training or on their way to the worker.
        checkpoint = tmp_path / "store" / "models" / f"{experiment_id}.r2.w-{group}.ckpt"
        wait_until(
            lambda: checkpoint.exists() and any(checkpoint.iterdir()),
            120,
            "round 2's first checkpoint",
            group_of,
        )
        down = time.monotonic()
        owned.stop(graceful=graceful)
        during = api.round_states(experiment_id)
        owned.start()
        outage_s = time.monotonic() - down

        rounds = wait_until(
            lambda: rounds_when_done(api, experiment_id, ROUNDS),
            180,
            f"{ROUNDS} rounds after the broker restart",
            group_of,
        )
        final = load(api.call("GET", f"/experiments/{experiment_id}/model"))
        cut_off = [n for n in ("server", "worker", "fleet") if _lost(group_of.log(n), owned.port)]

    assert during.get(2) == "training", f"the broker went down outside round 2: {during}"
    assert cut_off == ["server", "worker", "fleet"], f"only {cut_off} lost the broker"
    assert [r["state"] for r in rounds] == ["committed"] * ROUNDS, rounds
    for record in rounds:
        # Each accepted update listed once, and every device's update accepted.
        assert record["accepted"] == 20, record
        assert len(record["accepted_updates"]) == len(set(record["accepted_updates"])) == 20
    worst = max_difference(final, expected)
    assert worst <= 1e-6, f"the restart ({outage_s:.1f} s down) changed the model by {worst}"


def _lost(log: str, port: int) -> bool:
    """Return whether a log holds a transport's line on losing the broker on ``port``."""
    line = rf"lost (the connection to )?\S*127\.0\.0\.1:{port}\b.*; reconnecting$"
    return re.search(line, log, re.MULTILINE) is not None


def _logged(caplog: pytest.LogCaptureFixture, text: str, timeout: float) -> bool:
    """Wait until a captured log message contains ``text``; return whether one did."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(text in record.getMessage() for record in list(caplog.records)):
            return True
        time.sleep(0.05)
    return False


def _config() -> dict[str, Any]:
    raw: dict[str, Any] = copy.deepcopy(DEMO_CONFIG)
    raw["seed"] = SEED
    raw["rounds"]["count"] = ROUNDS
    raw["training"]["epochs"] = EPOCHS
    return raw
