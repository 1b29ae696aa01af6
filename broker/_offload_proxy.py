"""The offloaded process's side: a ``Transport`` that forwards every call over a ``Link``.

One thread does the work: ``serve`` reads frames and runs each handler in
arrival order, as the MQTT transport's dispatcher does. There is no separate
reader thread on purpose: a reader that needs the interpreter lock after
every read would wait behind each handler that holds it (the very contention
offloading removes from the parent). A thread waiting for a reply (``publish``,
``subscribe`` and ``cancel`` wait; ``ack`` and ``nack`` do not) reads the link
itself while nobody else does, queueing the deliveries it meets for ``serve``.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from broker._offload_wire import Frame, Kind, Link, OffloadError
from broker.errors import BrokerError, ConnectionLost, TransportError
from broker.transport import Handler

log = logging.getLogger("broker.offload")

_REMOTE_ERRORS: dict[str, type[TransportError]] = {"ConnectionLost": ConnectionLost}
"""Errors of the host's transport raised here as themselves; others become TransportError."""


@dataclass(eq=False)
class ProxyDelivery:
    """A message the host received; settling it settles the host's delivery."""

    topic: str
    body: bytes = field(repr=False)
    redelivered: bool
    _ident: int = field(repr=False)
    _owner: ProxyTransport = field(repr=False)
    settled: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ack(self) -> None:
        """Have the host ack the message."""
        self._mark("ack")
        self._owner._tell(Frame(Kind.ACK, ident=self._ident))

    def nack(self, requeue: bool = False) -> None:
        """Have the host requeue the message, or dead-letter it."""
        self._mark("requeue" if requeue else "dead")
        self._owner._tell(Frame(Kind.NACK, flags=int(requeue), ident=self._ident))

    def _mark(self, how: str) -> None:
        with self._lock:
            if self.settled is not None:
                raise TransportError(f"message already settled ({self.settled})")
            self.settled = how


@dataclass(eq=False)
class ProxySubscription:
    """Handle returned by ``ProxyTransport.subscribe``."""

    channel: int
    topic: str
    _owner: ProxyTransport = field(repr=False)

    def cancel(self) -> None:
        """Cancel the host's subscription; later deliveries for it are requeued."""
        self._owner._cancel(self)


class ProxyTransport:
    """A ``Transport`` whose broker connection lives in another process.

    Handlers run in the thread that calls ``serve``.

    Parameters
    ----------
    link
        The link to a ``TransportHost``.
    """

    def __init__(self, link: Link) -> None:
        self._link = link
        self._cond = threading.Condition()
        self._handlers: dict[int, Handler] = {}
        self._channels = itertools.count(1)
        self._requests = itertools.count(1)
        self._replies: dict[int, Frame | None] = {}
        self._ready: deque[tuple[Handler, ProxyDelivery]] = deque()
        self._reading = False
        self._stop_requested = False
        self._ended = False
        self._closed = False

    def on_reconnect(self, listener: Callable[[], None]) -> None:
        """Accept a reconnect listener: the parent process owns the connection and reconnects."""

    def publish(self, topic: str, body: bytes) -> None:
        """Have the host publish ``body``; return once its transport has."""
        self._request(Frame(Kind.PUBLISH, meta=topic, body=body))

    def subscribe(
        self, topic: str, handler: Handler, *, group: str | None = None
    ) -> ProxySubscription:
        """Subscribe through the host; ``handler`` runs in the thread that calls ``serve``."""
        with self._cond:
            channel = next(self._channels)
            # Registered before asking: a resumed session may deliver before the reply.
            self._handlers[channel] = handler
        frame = Frame(
            Kind.SUBSCRIBE,
            flags=int(group is not None),
            channel=channel,
            meta=topic,
            body=(group or "").encode(),
        )
        try:
            self._request(frame)
        except BaseException:
            with self._cond:
                self._handlers.pop(channel, None)
            raise
        return ProxySubscription(channel, topic, self)

    def ready(self) -> None:
        """Tell the host that the offloaded target has started."""
        self._tell(Frame(Kind.READY))

    def serve(self) -> bool:
        """Run handlers until the host asks to stop (True) or the link ends (False)."""
        while True:
            self._pump_until(lambda: bool(self._ready) or self._stop_requested or self._ended)
            with self._cond:
                if self._stop_requested or self._ended:
                    return self._stop_requested
                handler, delivery = self._ready.popleft()
            _run(handler, delivery)

    def close(self) -> None:
        """End the link; queued deliveries stay unsettled with the host. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._link.close()

    # -- called by deliveries and subscriptions ----------------------------------

    def _tell(self, frame: Frame) -> None:
        """Send a frame that needs no answer."""
        self._link.send(frame)

    def _cancel(self, sub: ProxySubscription) -> None:
        with self._cond:
            if self._handlers.pop(sub.channel, None) is None:
                return
        self._request(Frame(Kind.CANCEL, channel=sub.channel))

    def _request(self, frame: Frame) -> None:
        """Send ``frame`` as a numbered request and wait for the host's reply."""
        with self._cond:
            if self._ended or self._closed:
                raise OffloadError("the link to the transport's process is closed")
            ident = next(self._requests)
            self._replies[ident] = None
        try:
            self._link.send(
                Frame(frame.kind, frame.flags, frame.channel, ident, frame.meta, frame.body)
            )
            self._pump_until(lambda: self._replies[ident] is not None or self._ended)
        finally:
            with self._cond:
                reply = self._replies.pop(ident, None)
        if reply is None:
            raise OffloadError("the transport's process went away")
        if reply.flags:
            error = _REMOTE_ERRORS.get(reply.meta, TransportError)
            raise error(reply.body.decode(errors="replace"))

    # -- reading: one thread at a time -------------------------------------------

    def _pump_until(self, done: Callable[[], bool]) -> None:
        """Read frames until ``done()`` holds, or wait while another thread reads."""
        while True:
            with self._cond:
                while not done() and self._reading:
                    self._cond.wait()
                if done():
                    return
                self._reading = True
            frame = None
            try:
                frame = self._link.receive()
            except OffloadError as exc:
                log.debug("offload link ended: %s", exc)
            finally:
                with self._cond:
                    self._reading = False
                    self._take(frame)
                    self._cond.notify_all()

    def _take(self, frame: Frame | None) -> None:
        """Route one frame (lock held); None marks the end of the link."""
        if frame is None:
            self._ended = True
        elif frame.kind is Kind.DELIVER:
            handler = self._handlers.get(frame.channel)
            if handler is None:  # cancelled meanwhile: let another consumer have it
                self._tell(Frame(Kind.NACK, flags=1, ident=frame.ident))
                return
            delivery = ProxyDelivery(frame.meta, frame.body, bool(frame.flags), frame.ident, self)
            self._ready.append((handler, delivery))
        elif frame.kind is Kind.REPLY:
            if frame.ident in self._replies:
                self._replies[frame.ident] = frame
        elif frame.kind is Kind.STOP:
            self._stop_requested = True
        else:
            log.warning("unexpected %s frame from the transport's process", frame.kind.name)


def _run(handler: Handler, delivery: ProxyDelivery) -> None:
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
