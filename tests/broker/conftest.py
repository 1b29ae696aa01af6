"""The buses the transport contract runs against: in-process, RabbitMQ, Mosquitto."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from broker import MemoryTransport, Transport, connect
from tests.brokers import AMQP_PORT, MQTT_PORT, amqp_url, delete_amqp_groups, mqtt_url, require
from tests.tcp_proxy import TcpProxy


@dataclass
class Bus:
    """A transport under test plus what the contract needs to exercise it."""

    kind: str
    open: Callable[[], Transport]
    """Open another connection with the same identity (same MQTT client id)."""
    root: str = field(default_factory=lambda: f"test/{uuid.uuid4().hex[:10]}")
    proxy: TcpProxy | None = None
    opened: list[Transport] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)

    def group(self) -> str:
        """Return a fresh group name, removed from the broker after the test."""
        name = f"g-{uuid.uuid4().hex[:8]}"
        self.groups.append(name)
        return name

    def connect(self) -> Transport:
        """Open a transport and remember to close it."""
        transport = self.open()
        self.opened.append(transport)
        return transport


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; return whether it held."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture(params=["memory", "amqp", "mqtt"])
def bus(request: pytest.FixtureRequest) -> Iterator[Bus]:
    """Every transport, the in-process one included."""
    yield from _bus(request.param)


@pytest.fixture(params=["amqp", "mqtt"])
def network_bus(request: pytest.FixtureRequest) -> Iterator[Bus]:
    """The transports with a connection that can be lost."""
    yield from _bus(request.param)


def _bus(kind: str) -> Iterator[Bus]:
    """Open a bus of ``kind`` and clean up after the test."""
    if kind == "memory":
        shared = MemoryTransport()
        bus = Bus(kind, lambda: shared)
    elif kind == "amqp":
        require(AMQP_PORT, "RabbitMQ")
        proxy = TcpProxy(AMQP_PORT)
        bus = Bus(kind, lambda: connect(amqp_url(proxy.port)), proxy=proxy)
    else:
        require(MQTT_PORT, "Mosquitto")
        proxy = TcpProxy(MQTT_PORT)
        client_id = f"contract-{uuid.uuid4().hex[:8]}"
        bus = Bus(kind, lambda: connect(mqtt_url(proxy.port, client_id=client_id)), proxy=proxy)
    yield bus
    for transport in reversed(bus.opened):
        transport.close()
    if bus.proxy is not None:
        bus.proxy.close()
    if kind == "amqp":
        delete_amqp_groups(bus.groups)
