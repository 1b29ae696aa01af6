"""RabbitMQ transport (``amqp://``), on pika.

Threads. One I/O thread (``fedmq-amqp-io``, in ``broker._amqp_io``) owns the
``pika.BlockingConnection`` and every channel, and makes every pika call. It
alternates between ``process_data_events(time_limit=...)``, which reads
deliveries, confirms and heartbeats, and draining a command deque that other
threads fill: ``publish``, ``subscribe``, ``cancel``, ``ack`` and ``nack`` append
a command and wake the loop with ``add_callback_threadsafe``. ``publish``,
``subscribe`` and ``cancel`` wait on a future for the result; acks and nacks do
not wait. Each subscription has its own dispatcher thread: the I/O thread only
hands it deliveries, so a handler that trains a model for a minute neither
starves heartbeats nor holds up other subscriptions, and each subscription sees
its messages in order.

Why BlockingConnection rather than SelectConnection: declares and confirms are
plain calls whose errors reach the caller directly, with no callback chains to
rebuild after a reconnect. The cost is one confirm round trip per publish, in
series on the I/O thread (a few thousand 1 KB messages a second), which FedMQ's
control traffic and model references (never tensors) stay far below.

Topology. A durable topic exchange ``fedmq`` carries every message, persistent
and confirmed. A group subscription consumes the durable queue
``fedmq.group.<group>``, shared by the group's members (competing consumers); a
plain one its own durable queue ``fedmq.sub.<random id>``. That queue is not
tied to the connection, so what is published to the subscriber while it
reconnects, or while the broker restarts, waits for it; ``cancel`` and
``close`` delete it, and RabbitMQ drops it after ``PLAIN_QUEUE_EXPIRY_S`` without
a consumer (a process that died without closing). Both kinds dead-letter to the
fanout exchange ``fedmq.dlx`` and its durable queue ``fedmq.dead-letters``. Each
subscription has its own channel, so a broker error on one (say, a group queue
declared elsewhere with other arguments) cannot take the others down. The
queues are classic, or with ``queue_type=quorum`` quorum queues, replicated
across a cluster's nodes (``broker._amqp_options.queue_arguments`` says why
plain ones too).

Reconnect. When the connection drops, the I/O thread reconnects with
``broker.retry.backoff``, redeclares the topology and re-subscribes every live
subscription on fresh channels. A URL naming several nodes of a cluster
(``amqp://user:pw@host1,host2,host3/vhost``) fails over: each connect tries
them in turn from the node after the one last reached (``broker._amqp_nodes``).
Deliveries from the dead channels can no longer be settled: their
``ack``/``nack`` is a logged no-op and the broker redelivers them. A publish
caught by the drop is sent again after the reconnect (at least once), and so is
one the broker nacks (a quorum queue between two leaders), on a fresh channel
after a short back-off; ``publish`` raises ``ConnectionLost`` only after
``publish_timeout``, and after ``max_attempts`` failed reconnects every call
raises ``ConnectionLost``. ``on_reconnect`` listeners run after each
reconnect, on a thread of their own, once the subscriptions are restored.

TLS. ``amqps://`` verifies the broker's certificate against the URL's ``ca``
(or the system's store) and its host name, with pika's ``SSLOptions`` over a
context built here (``broker.connect.tls_from_query``) rather than pika's
``ssl_options`` query, which it evaluates as a Python literal.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

from broker._amqp_io import Channel, IoThread
from broker._amqp_options import (
    DEAD_LETTERS,
    EXCHANGE,
    GROUP_PREFIX,
    PLAIN_PREFIX,
    PLAIN_QUEUE_EXPIRY_S,
    AmqpOptions,
    parse_url,
    routing_key,
    topic_of,
)
from broker.errors import TransportError
from broker.transport import Handler, ReconnectListener, Will, notify_reconnected

__all__ = [
    "DEAD_LETTERS",
    "EXCHANGE",
    "GROUP_PREFIX",
    "PLAIN_PREFIX",
    "PLAIN_QUEUE_EXPIRY_S",
    "AmqpDelivery",
    "AmqpSubscription",
    "AmqpTransport",
]

log = logging.getLogger(__name__)

# Settlements each subscription remembers for redelivered copies (32-byte ids: ~2 MB).
_REMEMBERED = 16384


class AmqpDelivery:
    """One message received from RabbitMQ."""

    def __init__(
        self, sub: AmqpSubscription, channel: Channel, method: Any, properties: Any, body: bytes
    ) -> None:
        self.topic: str = topic_of(method.routing_key)
        self.body: bytes = body
        self.redelivered: bool = bool(method.redelivered)
        self.message_id: str | None = properties.message_id
        """The transport's id for this publish (not the envelope's ``message_id``)."""
        self.settled: str | None = None
        self._sub = sub
        self._channel = channel
        self._tag: int = method.delivery_tag

    def ack(self) -> None:
        """Let the broker forget the message (sent by the I/O thread, not awaited)."""
        self._settle("ack", lambda ch: ch.basic_ack(self._tag))

    def nack(self, requeue: bool = False) -> None:
        """Requeue the message (it comes back redelivered), or dead-letter it."""
        how = "requeue" if requeue else "dead"
        self._settle(how, lambda ch: ch.basic_nack(self._tag, requeue=requeue))

    def _settle(self, how: str, action: Callable[[Channel], None]) -> None:
        # A second settle would make the broker close the channel (unknown delivery tag).
        if self.settled is not None:
            raise TransportError(f"message already settled ({self.settled})")
        self.settled = how
        self._sub._remember(self, how)
        self._sub._io.settle(self._sub, self._channel, action)


class AmqpSubscription:
    """Handle returned by ``AmqpTransport.subscribe``; runs the handler on its own thread."""

    def __init__(self, io: IoThread, topic: str, handler: Handler, group: str | None) -> None:
        self.topic = topic
        self.key = routing_key(topic, pattern=True)
        self.group = group
        self.queue = GROUP_PREFIX + group if group is not None else PLAIN_PREFIX + uuid.uuid4().hex
        self.active = True
        self.channel: Channel = None
        self._io = io
        self._handler = handler
        self._inbox: queue.SimpleQueue[AmqpDelivery | None] = queue.SimpleQueue()
        self._settled: OrderedDict[str, str] = OrderedDict()
        self._settled_lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._dispatch, name=f"fedmq-amqp-sub:{topic}", daemon=True
        )
        self._thread.start()

    def cancel(self) -> None:
        """Stop delivering; messages not yet settled go back to the queue."""
        if not self.active:
            return
        self.active = False
        # Without a connection the broker has already dropped the consumer.
        with contextlib.suppress(TransportError):
            self._io.call(partial(self._io.unsubscribe_now, self), retry=False)
        self.stop()

    def deliver(self, channel: Channel, method: Any, properties: Any, body: bytes) -> None:
        """Queue a message for the handler (called on the I/O thread)."""
        self._inbox.put(AmqpDelivery(self, channel, method, properties, body))

    def stop(self) -> None:
        """End the dispatcher thread once the handler returns."""
        self.active = False
        self._inbox.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _remember(self, delivery: AmqpDelivery, how: str) -> None:
        # A settle made as the connection drops never reaches the broker, which then
        # redelivers the message; remembering it lets the copy be settled the same way
        # instead of handled twice. The latest settle wins; a requeue wants it back.
        if delivery.message_id is None:
            return
        with self._settled_lock:
            if how == "requeue":
                self._settled.pop(delivery.message_id, None)
                return
            self._settled[delivery.message_id] = how
            if len(self._settled) > _REMEMBERED:
                self._settled.popitem(last=False)

    def _replay(self, delivery: AmqpDelivery) -> bool:
        """Settle a redelivered copy as its first copy was settled; return whether it was."""
        if not delivery.redelivered or delivery.message_id is None:
            return False
        with self._settled_lock:
            how = self._settled.pop(delivery.message_id, None)
        if how is None:
            return False
        log.debug("settling redelivered %s as before (%s)", delivery.message_id, how)
        if how == "ack":
            delivery.ack()
        else:
            delivery.nack(requeue=False)
        return True

    def _dispatch(self) -> None:
        while (delivery := self._inbox.get()) is not None:
            if not self.active or delivery._channel is not self.channel:
                # Its channel died; the broker redelivers it on the new one.
                log.debug("dropped a delivery from a closed channel on %s", self.topic)
                continue
            if self._replay(delivery):
                continue
            try:
                self._handler(delivery)
            except Exception:
                log.exception("handler for %s failed; message dead-lettered", delivery.topic)
                if delivery.settled is None:
                    delivery.nack(requeue=False)


class AmqpTransport:
    """The RabbitMQ transport (``amqp[s]://user:pass@host:port[,host:port...]/vhost?...``)."""

    def __init__(self, options: AmqpOptions) -> None:
        self._listeners: list[ReconnectListener] = []
        self._listeners_lock = threading.Lock()
        self._io = IoThread(options, on_reconnected=self._reconnected)
        self._io.start()

    @classmethod
    def from_url(
        cls, url: str, *, client_id: str | None = None, will: Will | None = None
    ) -> AmqpTransport:
        """Connect to the broker at ``url``; raise ``ConnectionLost`` if it cannot be reached.

        Parameters
        ----------
        url
            ``amqp://user:pass@host:port/vhost`` or ``amqps://...`` (port 5671 by
            default); a cluster's nodes comma-separated, ``host1:port,host2:port``,
            to fail over between them. Besides pika's own query options it takes
            ``prefetch`` (unacked messages per consumer, default 1000, 0 for no
            limit), ``publish_timeout`` (seconds, default 60), ``max_attempts``
            (reconnects before giving up, default ``broker.retry.MAX_ATTEMPTS``, 0
            for never), ``queue_type`` (``classic``, the default, or ``quorum``:
            the kind of queue every subscription declares), ``client_id``, and for
            ``amqps://`` ``ca``, ``cert`` and ``key`` (PEM file paths: the CA to
            verify the broker with, our certificate and key).
        client_id
            The connection's name in RabbitMQ (overrides the URL's ``client_id``).
        will
            Accepted and ignored: AMQP has no last will. A consumer that vanishes
            loses its consumers, and its unacked messages go back to their queues.

        Returns
        -------
        AmqpTransport
            A connected transport.

        Raises
        ------
        TlsError
            The broker's certificate did not verify, or it refused ours.
        ConnectionLost
            The broker could not be reached, or refused the login.
        """
        return cls(parse_url(url, client_id=client_id))

    def publish(self, topic: str, body: bytes) -> None:
        """Publish persistently to ``topic``; return once the broker confirmed it.

        Parameters
        ----------
        topic
            A ``/``-separated topic without wildcards.
        body
            The message bytes.
        """
        key = routing_key(topic)
        # One id for every attempt, so a copy resent after a reconnect is recognisable.
        publish = partial(self._io.publish_now, key, bytes(body), uuid.uuid4().hex)
        self._io.call(publish, retry=True)

    def subscribe(
        self, topic: str, handler: Handler, *, group: str | None = None
    ) -> AmqpSubscription:
        """Call ``handler`` on a dispatcher thread for each message matching ``topic``.

        Parameters
        ----------
        topic
            A ``/``-separated pattern; ``+`` matches one segment, ``#`` the rest.
        handler
            Called with each ``AmqpDelivery``; if it raises, the message is dead-lettered.
        group
            Share the durable queue ``fedmq.group.<group>`` with the group's other
            subscribers; without it, receive a copy of every message.

        Returns
        -------
        AmqpSubscription
            The handle to ``cancel``.
        """
        sub = AmqpSubscription(self._io, topic, handler, group)
        try:
            self._io.call(partial(self._io.subscribe_now, sub), retry=True)
        except BaseException:
            sub.stop()
            raise
        return sub

    def on_reconnect(self, listener: ReconnectListener) -> None:
        """Call ``listener`` on a thread of its own after every reconnect (not the first connect).

        Parameters
        ----------
        listener
            Called with no arguments once the subscriptions are restored; it may publish.
        """
        with self._listeners_lock:
            self._listeners.append(listener)

    def close(self) -> None:
        """Close the connection; messages not yet settled go back to the broker."""
        if self._io.stop():
            for sub in list(self._io.consumers):
                sub.stop()

    def _reconnected(self) -> None:
        """Start the reconnect listeners (called on the I/O thread, which they must not block)."""
        with self._listeners_lock:
            listeners = list(self._listeners)
        notify_reconnected(listeners, "fedmq-amqp-reconnected")
