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
- ``on_reconnect`` listeners run after every reconnect, on a thread of their
  own (so they may publish); a transport that never reconnects never calls them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


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
ReconnectListener = Callable[[], None]
Will = tuple[str, bytes]
"""A last will: the topic and the frame the broker publishes if the client vanishes."""


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

    def on_reconnect(self, listener: ReconnectListener) -> None:
        """Call ``listener`` on a thread of its own after every reconnect, not the first connect."""
        ...

    def close(self) -> None:
        """Release the connection; unsettled messages go back to the broker."""
        ...


@runtime_checkable
class BatchPublisher(Protocol):
    """A transport that can have many publishes in flight at once (MQTT)."""

    def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish every ``(topic, body)``, all in flight at once; return once each is confirmed."""
        ...


def publish_all(transport: Transport, messages: Sequence[tuple[str, bytes]]) -> None:
    """Publish ``messages`` in order: all in flight at once where the transport can, else in turn.

    What a coordinator sending a round's tasks uses: with one broker round
    trip per message, 10,000 tasks took minutes.
    """
    if isinstance(transport, BatchPublisher):
        transport.publish_many(messages)
        return
    for topic, body in messages:
        transport.publish(topic, body)


def notify_reconnected(listeners: Sequence[ReconnectListener], name: str) -> None:
    """Run ``listeners`` on a new daemon thread; one that fails does not stop the others."""
    # Never on the connection's own thread: a listener that publishes waits for
    # that thread to send the message and take the broker's confirm.
    if listeners:
        threading.Thread(target=_notify, args=(list(listeners),), name=name, daemon=True).start()


def _notify(listeners: list[ReconnectListener]) -> None:
    for listener in listeners:
        try:
            listener()
        except Exception:
            log.exception("a reconnect listener failed")


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
