"""The receiving half of the MQTT transport: routes, deliveries and the dispatcher thread.

Nothing here touches paho; ``MqttTransport`` guards a ``RouteTable`` with its
lock and hands ``MqttDelivery`` objects to the ``Dispatcher``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from broker.errors import BrokerError, TransportError
from broker.transport import Handler, topic_matches

log = logging.getLogger("broker.mqtt")

REDELIVERED_PROPERTY = "fedmq-redelivered"
"""User property marking a message republished by ``nack(requeue=True)``."""
DEAD_LETTER_PREFIX = "fedmq/dead-letters"
"""``nack(requeue=False)`` republishes a message under this prefix plus its topic."""
MAX_PARKED = 10_000

READ_AHEAD_BYTES = 16 * 1024 * 1024
"""Bytes of received messages that may wait for their handler before the reader pauses.

Forty 400 KB updates: ample to keep a handler busy, small enough to stay in
memory the allocator reuses (see ``Dispatcher``).
"""

_SUB_ID_RANGE = 268_435_455  # MQTT 5 subscription identifiers are 1 .. 2**28 - 1


def subscription_id(broker_filter: str) -> int:
    """Return a stable MQTT 5 subscription identifier for ``broker_filter``."""
    # Derived from the filter rather than counted, so that a new transport that
    # resumes a persistent session recognises what its predecessor subscribed.
    return zlib.crc32(broker_filter.encode()) % _SUB_ID_RANGE + 1


def dead_letter_topic(topic: str) -> str:
    """Return where a refused message on ``topic`` is parked."""
    return f"{DEAD_LETTER_PREFIX}/{topic}"


@dataclass(eq=False)
class Route:
    """One subscription as the broker sees it, and the local handlers it feeds."""

    topic: str
    group: str | None
    broker_filter: str
    sub_id: int
    handlers: list[Handler] = field(default_factory=list)
    turn: itertools.count[int] = field(default_factory=itertools.count)

    def pick(self) -> list[Handler]:
        """Return who gets one message: every plain subscriber, or the group member next in turn."""
        if not self.handlers:
            return []
        if self.group is None:
            return list(self.handlers)
        return [self.handlers[next(self.turn) % len(self.handlers)]]


@dataclass(eq=False)
class Inbound:
    """One received PUBLISH; it is acked once every local delivery of it is settled."""

    mid: int
    qos: int
    topic: str
    body: bytes = field(repr=False)
    redelivered: bool
    epoch: int
    """The connection it arrived on; an ack on a later connection would hit a reused packet id."""
    sub_ids: tuple[int, ...] = ()
    pending: int = 0


class Settler(Protocol):
    """What a delivery needs from its transport to settle."""

    def _settle(self, inbound: Inbound) -> None:
        """Count one local delivery of ``inbound`` as settled."""
        ...

    def _republish(self, topic: str, body: bytes, *, redelivered: bool) -> None:
        """Publish ``body`` again, marked as redelivered or not."""
        ...


@dataclass(eq=False)
class MqttDelivery:
    """A message handed to one handler."""

    topic: str
    body: bytes = field(repr=False)
    redelivered: bool
    _inbound: Inbound = field(repr=False)
    _owner: Settler = field(repr=False)
    settled: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ack(self) -> None:
        """Tell the broker the message is done (PUBACK)."""
        self._mark("ack")
        self._owner._settle(self._inbound)

    def nack(self, requeue: bool = False) -> None:
        """Republish the message marked redelivered, or to the dead letters; then ack it."""
        self._mark("requeue" if requeue else "dead")
        # MQTT has no negative ack: a copy goes back to the broker first, so a
        # crash between the two steps duplicates the message instead of losing it.
        if requeue:
            self._owner._republish(self.topic, self.body, redelivered=True)
        else:
            self._owner._republish(dead_letter_topic(self.topic), self.body, redelivered=False)
        self._owner._settle(self._inbound)

    def _mark(self, how: str) -> None:
        with self._lock:
            if self.settled is not None:
                raise TransportError(f"message already settled ({self.settled})")
            self.settled = how


@dataclass(eq=False)
class MqttSubscription:
    """Handle returned by ``MqttTransport.subscribe``."""

    route: Route
    handler: Handler
    _cancel: Callable[[Route, Handler], None]

    def cancel(self) -> None:
        """Stop delivering to this handler; the last one out unsubscribes at the broker."""
        self._cancel(self.route, self.handler)


class RouteTable:
    """Which handlers an incoming message goes to; messages nobody wants yet wait here.

    Not thread-safe: the transport holds its lock around every call.
    """

    def __init__(self, *, shared_groups: bool) -> None:
        self._shared = shared_groups
        self._routes: dict[tuple[str, str | None], Route] = {}
        self._by_id: dict[int, Route] = {}
        self._parked: deque[Inbound] = deque()
        self.parked_bytes = 0

    def routes(self) -> list[Route]:
        """Return every route, in subscription order."""
        return list(self._routes.values())

    def add(self, topic: str, group: str | None, handler: Handler) -> tuple[Route, bool]:
        """Attach ``handler``; return its route and whether the broker must be told."""
        route = self._routes.get((topic, group))
        if route is None:
            # Without MQTT 5 shared subscriptions a group is a plain subscription
            # whose members compete only inside this process.
            shared = self._shared and group is not None
            broker_filter = f"$share/{group}/{topic}" if shared else topic
            fresh = all(r.broker_filter != broker_filter for r in self._routes.values())
            route = Route(topic, group, broker_filter, subscription_id(broker_filter))
            self._routes[(topic, group)] = route
            self._by_id[route.sub_id] = route
        else:
            fresh = False
        route.handlers.append(handler)
        return route, fresh

    def remove(self, route: Route, handler: Handler) -> bool:
        """Detach ``handler``; return whether the broker subscription is no longer needed."""
        if handler in route.handlers:
            route.handlers.remove(handler)
        if route.handlers or self._routes.get((route.topic, route.group)) is not route:
            return False
        del self._routes[(route.topic, route.group)]
        self._by_id.pop(route.sub_id, None)
        return all(r.broker_filter != route.broker_filter for r in self._routes.values())

    def targets(self, inbound: Inbound) -> list[Handler]:
        """Return the handlers ``inbound`` goes to, advancing group turns."""
        if inbound.sub_ids and self._shared:
            # MQTT 5 names the subscriptions a copy is for, which tells a group's
            # copy from a plain subscriber's copy of the same message.
            routes = [self._by_id[i] for i in inbound.sub_ids if i in self._by_id]
            routes = [r for r in routes if topic_matches(r.topic, inbound.topic)]
        else:
            routes = [r for r in self._routes.values() if topic_matches(r.topic, inbound.topic)]
        return [handler for route in routes for handler in route.pick()]

    def park(self, inbound: Inbound) -> None:
        """Hold a message that arrived before its subscriber (a resumed session's backlog)."""
        if len(self._parked) >= MAX_PARKED:
            # Left unacked, the broker delivers it again on the next connection.
            dropped = self._parked.popleft()
            self.parked_bytes -= len(dropped.body)
            log.warning("too many unrouted MQTT messages; dropped one on %s", dropped.topic)
        self._parked.append(inbound)
        self.parked_bytes += len(inbound.body)

    def unpark(self) -> list[tuple[Inbound, list[Handler]]]:
        """Take back the parked messages some handler now wants, in arrival order."""
        ready, waiting = [], deque[Inbound]()
        for inbound in self._parked:
            handlers = self.targets(inbound)
            if handlers:
                ready.append((inbound, handlers))
            else:
                waiting.append(inbound)
        self._parked = waiting
        self.parked_bytes = sum(len(inbound.body) for inbound in waiting)
        return ready


class Dispatcher:
    """One thread that runs handlers in arrival order, away from paho's network thread.

    It also bounds how far the network thread reads ahead of the handlers:
    ``wait_for_room`` holds the reader while more than ``read_ahead`` bytes of
    messages wait for their handler. Unbounded, a worker resuming a session
    that holds a backlog read it all into memory at once (1,000 updates of
    400 KB: 400 MB), and every buffer was fresh memory the kernel had to
    fault in: on the 2-core test machine the network thread spent 1.1 ms of
    system time per 400 KB update, against 0.2 ms when it reads only as fast
    as the handler takes messages.
    """

    def __init__(self, name: str, *, read_ahead: int = READ_AHEAD_BYTES) -> None:
        self._queue: queue.SimpleQueue[tuple[Handler, MqttDelivery] | None] = queue.SimpleQueue()
        self._stopping = False
        self._read_ahead = read_ahead
        self._room = threading.Condition(threading.Lock())
        self._queued_bytes = 0
        self._waiting = 0
        self._running_since: float | None = None  # when the running handler call began
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        """Bytes of message bodies queued and not yet handed to their handler."""
        return self._queued_bytes

    def submit(self, handler: Handler, delivery: MqttDelivery) -> None:
        """Queue one handler call."""
        with self._room:
            self._queued_bytes += len(delivery.body)
        self._queue.put((handler, delivery))

    def stalled(self, after_s: float) -> bool:
        """Return whether one handler call has been running for more than ``after_s``."""
        began = self._running_since
        return began is not None and time.monotonic() - began > after_s

    def is_running_here(self) -> bool:
        """Return whether the caller is this dispatcher's handler thread."""
        return threading.current_thread() is self._thread

    def wait_for_room(self, timeout: float, held: Callable[[], int] = lambda: 0) -> bool:
        """Wait, at most ``timeout`` s, until at most ``read_ahead`` bytes wait here.

        ``held`` adds bytes the reader holds elsewhere (messages parked for a
        subscription to come). Returns whether there is room. Bounded, so that
        a handler stuck on something else (a store outage, say) slows the
        reader but cannot stop it.
        """
        with self._room:
            self._waiting += 1
            try:
                return self._room.wait_for(
                    lambda: self._stopping or self._queued_bytes + held() <= self._read_ahead,
                    timeout,
                )
            finally:
                self._waiting -= 1

    def stop(self, timeout: float = 5.0) -> None:
        """Finish the running handler and drop the queued ones (the broker keeps them)."""
        self._stopping = True
        with self._room:
            self._room.notify_all()
        self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            with self._room:
                self._queued_bytes -= len(item[1].body)
                if self._waiting:
                    self._room.notify_all()
            if not self._stopping:
                self._running_since = time.monotonic()
                try:
                    _call(*item)
                finally:
                    self._running_since = None


def _call(handler: Handler, delivery: MqttDelivery) -> None:
    """Run ``handler``; a failure dead-letters the message, as in the other transports."""
    try:
        handler(delivery)
    except Exception:
        log.exception("handler for %s failed; message dead-lettered", delivery.topic)
        if delivery.settled is None:
            try:
                delivery.nack(requeue=False)
            except BrokerError:
                log.exception("could not dead-letter a message from %s", delivery.topic)
