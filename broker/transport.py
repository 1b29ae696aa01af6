"""The one interface every transport implements (in-process, AMQP, MQTT).

Semantics all implementations promise:

- ``publish`` returns once the broker has the message (confirmed for AMQP,
  PUBACK for MQTT QoS 1, enqueued for in-process).
- Delivery is at least once: a message not acked is delivered again, so
  handlers must be idempotent (FedMQ drops duplicates by ``message_id``).
- Subscribers that pass the same ``group`` share one durable queue and each
  message goes to one of them (competing consumers); without a group every
  subscriber gets its own copy.
- Topic patterns use MQTT wildcards: ``+`` matches one segment, ``#`` the rest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Delivery(Protocol):
    """One received message; settle it exactly once with ``ack`` or ``nack``."""

    @property
    def topic(self) -> str:
        """Return the topic the message was published to."""
        ...

    @property
    def body(self) -> bytes:
        """Return the message bytes."""
        ...

    @property
    def redelivered(self) -> bool:
        """Return whether this message may have been delivered before."""
        ...

    def ack(self) -> None:
        """Settle the message: its effect is durable, the broker may forget it."""
        ...

    def nack(self, requeue: bool = False) -> None:
        """Refuse the message: requeue it, or send it to the dead letters."""
        ...


Handler = Callable[[Delivery], None]


class Subscription(Protocol):
    """A live subscription; cancel it to stop receiving."""

    def cancel(self) -> None:
        """Stop delivering to this subscription's handler."""
        ...


class Transport(Protocol):
    """Publish bytes to topics and deliver them to subscribed handlers."""

    def publish(self, topic: str, body: bytes) -> None:
        """Publish ``body`` to ``topic``; return once the broker holds it."""
        ...

    def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> Subscription:
        """Call ``handler`` for each message matching ``topic``."""
        ...

    def close(self) -> None:
        """Release the connection; unsettled messages go back to the broker."""
        ...


def topic_matches(pattern: str, topic: str) -> bool:
    """Return whether ``topic`` matches an MQTT-style ``pattern`` (``+`` and ``#``)."""
    pat = pattern.split("/")
    top = topic.split("/")
    for i, part in enumerate(pat):
        if part == "#":
            return True
        if i >= len(top) or (part != "+" and part != top[i]):
            return False
    return len(pat) == len(top)
