"""Test doubles for driving a worker by hand: a recording bus and settle-recording deliveries."""

from __future__ import annotations

from dataclasses import dataclass, field

from broker import encode


@dataclass
class FakeDelivery:
    body: bytes
    topic: str
    redelivered: bool = False
    settled: list[str] = field(default_factory=list)

    def ack(self) -> None:
        self.settled.append("ack")

    def nack(self, requeue: bool = False) -> None:
        self.settled.append("requeue" if requeue else "dead")


class Bus:
    """Records what the worker publishes; the test hands in each delivery."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.handlers: dict[str, object] = {}

    def publish(self, topic: str, body: bytes) -> None:
        self.published.append((topic, body))

    def subscribe(self, topic: str, handler: object, *, group: str | None = None) -> object:
        self.handlers[topic] = handler
        return object()

    def close(self) -> None:
        pass

    def deliver(self, topic: str, message: object, pattern: str) -> FakeDelivery:
        """Hand ``message`` to the handler subscribed to ``pattern``."""
        delivery = FakeDelivery(encode(message), topic)  # type: ignore[arg-type]
        self.handlers[pattern](delivery)  # type: ignore[operator]
        return delivery
