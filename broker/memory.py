"""In-process transport: the simulation mode's bus, and the reference for the contract.

One dispatcher thread delivers every message in publish order, so a
simulation whose handlers are deterministic is deterministic as a whole;
``join()`` waits until nothing is queued or running, which lets tests drain
the bus without sleeping.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from dataclasses import dataclass, field

from broker.errors import TransportError
from broker.transport import Handler, ReconnectListener, Will, topic_matches

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Queue:
    """A named queue: one per plain subscription, one shared per group."""

    pattern: str
    order: int
    """Its place among the bus's queues: a publish reaches its queues in this order."""
    consumers: list[_MemorySubscription] = field(default_factory=list)
    backlog: deque[tuple[str, bytes, bool]] = field(default_factory=deque)
    turn: itertools.count[int] = field(default_factory=itertools.count)


@dataclass
class MemoryDelivery:
    """A message handed to one in-process handler."""

    topic: str
    body: bytes
    redelivered: bool
    _queue: _Queue
    _transport: MemoryTransport
    settled: str | None = None

    def ack(self) -> None:
        """Forget the message."""
        self._settle("ack")

    def nack(self, requeue: bool = False) -> None:
        """Requeue the message, or move it to ``dead_letters``."""
        self._settle("requeue" if requeue else "dead")
        if requeue:
            self._transport._enqueue(self._queue, self.topic, self.body, redelivered=True)
        else:
            self._transport.dead_letters.append((self.topic, self.body))

    def _settle(self, how: str) -> None:
        if self.settled is not None:
            raise TransportError(f"message already settled ({self.settled})")
        self.settled = how


@dataclass(eq=False)
class _MemorySubscription:
    """Handle returned by ``MemoryTransport.subscribe``."""

    queue: _Queue
    handler: Handler
    transport: MemoryTransport
    active: bool = True

    def cancel(self) -> None:
        """Stop delivering; messages still queued stay for other group members."""
        with self.transport._lock:
            self.active = False
            if self in self.queue.consumers:
                self.queue.consumers.remove(self)


class MemoryTransport:
    """The in-process transport (``memory://``)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        # Exact topics are looked up, only wildcard patterns are matched one by one: a
        # fleet of N devices is N exact subscriptions, and scanning them all made
        # every publish O(N) (most of a 1,000-device simulated round).
        self._exact: dict[str, list[_Queue]] = {}
        self._wildcards: list[_Queue] = []
        self._queue_count = 0
        self._groups: dict[str, _Queue] = {}
        self._ready: deque[tuple[_Queue, str, bytes, bool]] = deque()
        self._busy = False
        self._closed = False
        self.dead_letters: list[tuple[str, bytes]] = []
        self.unsettled = 0
        self.delivered = 0
        """Messages handed to a handler so far (a drained bus stops counting)."""
        self._thread = threading.Thread(target=self._dispatch, name="fedmq-memory", daemon=True)
        self._thread.start()

    @classmethod
    def from_url(
        cls, url: str = "memory://", *, client_id: str | None = None, will: Will | None = None
    ) -> MemoryTransport:
        """Build a new bus from a ``memory://`` URL.

        Parameters
        ----------
        url
            ``memory://``; its query, if any, is ignored.
        client_id
            Accepted for the common signature and ignored: nothing identifies a client here.
        will
            Accepted and ignored: an in-process client cannot vanish without its process.

        Returns
        -------
        MemoryTransport
            A bus of its own, shared by nobody yet.
        """
        return cls()

    def publish(self, topic: str, body: bytes) -> None:
        """Queue ``body`` for every subscription whose pattern matches ``topic``."""
        with self._lock:
            if self._closed:
                raise TransportError("transport is closed")
            matched = [q for q in self._wildcards if topic_matches(q.pattern, topic)]
            exact = self._exact.get(topic)
            if exact:
                matched = sorted([*exact, *matched], key=lambda q: q.order) if matched else exact
            for queue in matched:
                self._enqueue_locked(queue, topic, bytes(body), redelivered=False)

    def subscribe(
        self, topic: str, handler: Handler, *, group: str | None = None
    ) -> _MemorySubscription:
        """Deliver matching messages to ``handler`` on the dispatcher thread."""
        with self._lock:
            if group is not None and group in self._groups:
                queue = self._groups[group]
                if queue.pattern != topic:
                    raise TransportError(f"group {group!r} is bound to {queue.pattern!r}")
            else:
                queue = _Queue(topic, self._queue_count)
                self._queue_count += 1
                if "+" in topic or "#" in topic:
                    self._wildcards.append(queue)
                else:
                    self._exact.setdefault(topic, []).append(queue)
                if group is not None:
                    self._groups[group] = queue
            sub = _MemorySubscription(queue, handler, self)
            queue.consumers.append(sub)
            while queue.backlog:
                self._ready.append((queue, *queue.backlog.popleft()))
            self._lock.notify_all()
            return sub

    def on_reconnect(self, listener: ReconnectListener) -> None:
        """Accept ``listener`` and never call it: the in-process bus has no connection to lose."""

    def join(self, timeout: float | None = None) -> None:
        """Block until every queued message has been handled; raise on timeout."""
        with self._lock:
            done = self._lock.wait_for(lambda: not self._ready and not self._busy, timeout)
            if not done:
                raise TimeoutError("memory transport did not drain in time")

    def close(self) -> None:
        """Stop the dispatcher; queued messages are dropped."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def _enqueue(self, queue: _Queue, topic: str, body: bytes, *, redelivered: bool) -> None:
        with self._lock:
            self._enqueue_locked(queue, topic, body, redelivered=redelivered)

    def _enqueue_locked(self, queue: _Queue, topic: str, body: bytes, *, redelivered: bool) -> None:
        if queue.consumers:
            self._ready.append((queue, topic, body, redelivered))
            self._lock.notify_all()
        else:
            # A group queue outlives its consumers, like a durable AMQP queue.
            queue.backlog.append((topic, body, redelivered))

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._ready or self._closed)
                if self._closed:
                    return
                queue, topic, body, redelivered = self._ready.popleft()
                if not queue.consumers:
                    queue.backlog.append((topic, body, redelivered))
                    continue
                consumer = queue.consumers[next(queue.turn) % len(queue.consumers)]
                self._busy = True
            delivery = MemoryDelivery(topic, body, redelivered, queue, self)
            self._run(consumer.handler, delivery)
            with self._lock:
                self.delivered += 1
                self._busy = False
                self._lock.notify_all()

    def _run(self, handler: Handler, delivery: MemoryDelivery) -> None:
        try:
            handler(delivery)
        except Exception as exc:
            if self._closed:  # the bus closed under a handler at work: the run is over
                log.info("handler for %s ended as the bus closed: %s", delivery.topic, exc)
            else:
                log.exception("handler for %s failed; message dead-lettered", delivery.topic)
            if delivery.settled is None:
                delivery.nack(requeue=False)
        if delivery.settled is None:
            self.unsettled += 1
