"""Where the real brokers are, and the rule for tests that need them.

A broker-backed test skips when its broker is unreachable on a developer's
machine, and fails under CI (``CI`` set), where `make test` has started it.
"""

from __future__ import annotations

import os
import socket

import pytest

from broker.bridge import routes
from broker.topics import Topics

AMQP_PORT = int(os.environ.get("FEDMQ_TEST_AMQP_PORT", "5672"))
MQTT_PORT = int(os.environ.get("FEDMQ_TEST_MQTT_PORT", "1883"))


def amqp_url(port: int = AMQP_PORT) -> str:
    """Return the test RabbitMQ's URL (through ``port``, e.g. a proxy's)."""
    return f"amqp://guest:guest@127.0.0.1:{port}/%2F"


def mqtt_url(port: int = MQTT_PORT, **options: str) -> str:
    """Return the test Mosquitto's URL with transport options as query parameters.

    Sessions expire two minutes after their client goes (not the default
    hour): a test's worker session subscribed to every experiment's updates
    would otherwise keep collecting later tests' updates in the broker's memory.
    """
    options = {"session_expiry": "120", **options}
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"mqtt://127.0.0.1:{port}" + (f"?{query}" if query else "")


def reachable(port: int) -> bool:
    """Return whether something listens on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def require(port: int, name: str) -> None:
    """Skip (or, under CI, fail) when the broker on ``port`` is down."""
    if not reachable(port):
        skip_or_fail(f"{name} is not reachable on 127.0.0.1:{port}")


def skip_or_fail(message: str) -> None:
    """Skip when a prerequisite is missing here; fail under CI, where make test provides it."""
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run this test (make test provides it)")
    pytest.skip(message)


def delete_amqp_groups(groups: list[str]) -> None:
    """Delete the durable queues a test's worker groups left on the shared RabbitMQ.

    A worker group has two: its updates and its combine requests.
    """
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url()))
    try:
        channel = connection.channel()
        for group in groups:
            channel.queue_delete(f"fedmq.group.{group}")
            channel.queue_delete(f"fedmq.group.{Topics.combiners_group(group)}")
    finally:
        connection.close()


def bridge_groups(namespace: str, name: str) -> list[str]:
    """Return the group queues of bridge ``name``, one a route, as ``broker.bridge`` names them."""
    return [f"{namespace}-bridge-{name}-{index}" for index in range(len(routes(Topics(namespace))))]
