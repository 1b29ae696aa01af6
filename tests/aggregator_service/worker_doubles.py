"""Test doubles for driving a worker by hand: a recording bus and settle-recording deliveries.

What the bus hands in is signed as its sender would sign it (``tests.identities.sign``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from broker import Message
from tests.identities import sign


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


class Cancel:
    """A subscription of the ``Bus``: cancelled, its topic gets no more deliveries."""

    def __init__(self, forget: Callable[[], object]) -> None:
        self._forget = forget

    def cancel(self) -> None:
        self._forget()


class Bus:
    """Records what the worker publishes; the test hands in each delivery."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.handlers: dict[str, object] = {}
        self.when_cancelled: Callable[[str], object] = lambda topic: None
        """Called with a subscription's topic as it is cancelled."""

    def publish(self, topic: str, body: bytes) -> None:
        self.published.append((topic, body))

    def subscribe(self, topic: str, handler: object, *, group: str | None = None) -> Cancel:
        self.handlers[topic] = handler

        def forget() -> None:
            self.when_cancelled(topic)
            self.handlers.pop(topic, None)

        return Cancel(forget)

    def close(self) -> None:
        pass

    def deliver(self, topic: str, message: Message, pattern: str) -> FakeDelivery:
        """Hand ``message``, signed by its sender, to the handler subscribed to ``pattern``."""
        return self.deliver_frame(topic, sign(message), pattern)

    def deliver_frame(
        self, topic: str, body: bytes, pattern: str, *, redelivered: bool = False
    ) -> FakeDelivery:
        """Hand the frame ``body`` as it is to the handler subscribed to ``pattern``."""
        delivery = FakeDelivery(body, topic, redelivered)
        self.handlers[pattern](delivery)  # type: ignore[operator]
        return delivery
