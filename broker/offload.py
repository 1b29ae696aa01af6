"""Run a transport's consumer in a child process, with the connection kept in this one.

Why: a network client written in Python (paho's receive loop above all) and a
handler that does Python work per message compete for one interpreter lock,
and each slows the other. Offloaded, the parent process holds the real
transport and only moves bytes: it forwards each delivery over a Unix socket
(``broker._offload_wire``) and applies what comes back (acks, nacks,
publishes, subscriptions). The child runs ``target(transport, **kwargs)``
with a ``ProxyTransport`` and never touches the broker, so the consumer's
code is unchanged. It pays off only with a core to spare: each update is
copied through the socket once more, and the child needs a CPU of its own.

What stays true:

- Per subscription, the child sees messages in the order the parent's
  transport delivered them; one thread runs the child's handlers.
- A message is acked at the broker only when the child acks it; the parent
  applies the child's commands in the order they were sent.
- A delivery the parent could not forward is left unsettled, never
  dead-lettered: the broker delivers it again after the transport closes.
- If the child dies, the parent hears its end of the socket close at once
  (``failed``, ``on_exit``). If the parent dies, the child exits at once, even
  mid-handler (it watches the parent's lifeline pipe), so nothing it does can
  follow a successor's work; its unacked messages are redelivered as before.

The broker connection, its reconnects and its session stay the parent's
transport's business. Unacked messages are held twice (a body in each
process); the transport's own flow control (AMQP prefetch, MQTT Receive
Maximum) bounds how many.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from broker._offload_proxy import ProxyDelivery, ProxySubscription, ProxyTransport
from broker._offload_wire import Frame, Kind, Link, OffloadError
from broker.transport import Delivery, Subscription, Transport

__all__ = [
    "OffloadError",
    "OffloadedProcess",
    "ProxyDelivery",
    "ProxySubscription",
    "ProxyTransport",
    "TransportHost",
]

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ORPHANED_EXIT = 70
"""The child's exit status when its parent vanished."""


class TransportHost:
    """Serves ``transport`` to the ``ProxyTransport`` at the other end of ``link``.

    Parameters
    ----------
    transport
        The real transport; the host never closes it.
    link
        This end of the socket.
    on_end
        Called on the host's thread once the link ends, with whether a
        ``stop`` asked for it (False: the other side died or quit).
    """

    def __init__(
        self,
        transport: Transport,
        link: Link,
        *,
        on_end: Callable[[bool], None] | None = None,
    ) -> None:
        self._transport = transport
        self._link = link
        self._on_end = on_end
        self._lock = threading.Lock()
        self._deliveries: dict[int, Delivery] = {}
        self._subscriptions: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._stopping = False
        self.ready = threading.Event()
        """Set when the other side reports its target started."""
        self.ended = threading.Event()
        """Set when the link has ended."""
        self._thread = threading.Thread(target=self._serve, name="fedmq-offload-host", daemon=True)

    def start(self) -> TransportHost:
        """Start applying the other side's commands; return self."""
        self._thread.start()
        return self

    @property
    def unsettled(self) -> int:
        """Return how many forwarded deliveries the other side has not settled."""
        with self._lock:
            return len(self._deliveries)

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the other side to finish its handler and exit; return whether it did in time."""
        with self._lock:
            self._stopping = True
        with contextlib.suppress(OffloadError):  # already gone
            self._link.send(Frame(Kind.STOP))
        done = self.ended.wait(timeout)
        if not done:
            self._link.shutdown()
            self.ended.wait(5)
        return done

    # -- forwarding, on the transport's delivery threads -------------------------

    def _forward(self, channel: int, delivery: Delivery) -> None:
        """Hand one delivery to the other side; never raise (that would dead-letter it)."""
        ident = next(self._ids)
        with self._lock:
            if self._stopping or self.ended.is_set():
                return  # unsettled: the broker delivers it again once the transport closes
            self._deliveries[ident] = delivery
        flags = int(delivery.redelivered)
        try:
            self._link.send(
                Frame(Kind.DELIVER, flags, channel, ident, delivery.topic, delivery.body)
            )
        except OffloadError:
            with self._lock:
                self._deliveries.pop(ident, None)

    # -- the host's thread -----------------------------------------------------

    def _serve(self) -> None:
        try:
            while (frame := self._link.receive()) is not None:
                self._apply(frame)
        except OffloadError as exc:
            log.debug("offload link ended: %s", exc)
        with self._lock:
            asked = self._stopping
            self.ended.set()
            left = len(self._deliveries)
        if not asked:
            log.error("the offloaded process ended unexpectedly (%d messages unsettled)", left)
        if self._on_end is not None:
            self._on_end(asked)

    def _apply(self, frame: Frame) -> None:
        kind = frame.kind
        if kind is Kind.ACK or kind is Kind.NACK:
            self._settle(frame)
        elif kind is Kind.PUBLISH:
            self._answer(frame, lambda: self._transport.publish(frame.meta, frame.body))
        elif kind is Kind.SUBSCRIBE:
            self._answer(frame, lambda: self._subscribe(frame))
        elif kind is Kind.CANCEL:
            self._answer(frame, lambda: self._cancel(frame.channel))
        elif kind is Kind.READY:
            self.ready.set()
        else:
            log.warning("unexpected %s frame from the offloaded process", kind.name)

    def _settle(self, frame: Frame) -> None:
        with self._lock:
            delivery = self._deliveries.pop(frame.ident, None)
        if delivery is None:
            log.warning("the offloaded process settled an unknown delivery %d", frame.ident)
            return
        try:
            if frame.kind is Kind.ACK:
                delivery.ack()
            else:
                delivery.nack(requeue=bool(frame.flags))
        except Exception:  # the transport's error; the broker redelivers the message
            log.exception("could not settle a message from %s", delivery.topic)

    def _subscribe(self, frame: Frame) -> None:
        group = frame.body.decode() if frame.flags else None
        forward = functools.partial(self._forward, frame.channel)
        self._subscriptions[frame.channel] = self._transport.subscribe(
            frame.meta, forward, group=group
        )

    def _cancel(self, channel: int) -> None:
        subscription = self._subscriptions.pop(channel, None)
        if subscription is not None:
            subscription.cancel()

    def _answer(self, frame: Frame, action: Callable[[], None]) -> None:
        """Run ``action`` and reply to the request with its outcome."""
        reply = Frame(Kind.REPLY, ident=frame.ident)
        try:
            action()
        except Exception as exc:  # every failure goes back to the caller, as in-process
            reply = Frame(Kind.REPLY, 1, 0, frame.ident, type(exc).__name__, str(exc).encode())
        with contextlib.suppress(OffloadError):  # the other side is gone; _serve notices
            self._link.send(reply)


class OffloadedProcess:
    """A child process running ``target(proxy, **kwargs)`` over a transport held here.

    The child is spawned at once; ``wait_booted`` waits until it has imported
    ``target``, ``serve`` hands it the transport and waits until ``target``
    has returned (subscribed), ``stop`` ends it. Use:
    ``OffloadedProcess(start, kwargs).wait_booted().serve(transport)``.

    Parameters
    ----------
    target
        A module-level function (it is pickled by name) that starts the
        consumer on the transport it is given and returns.
    kwargs
        Its keyword arguments (picklable).
    on_exit
        Called, on a background thread, if the child ends without ``stop``.
    """

    def __init__(
        self,
        target: Callable[..., None],
        kwargs: Mapping[str, Any] | None = None,
        *,
        on_exit: Callable[[], None] | None = None,
        name: str = "fedmq-offload",
    ) -> None:
        self._on_exit = on_exit
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        level = logging.getLogger().getEffectiveLevel()
        context = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._process = context.Process(
            target=_child_main,
            args=(theirs, target, dict(kwargs or {}), level),
            name=name,
            daemon=True,
        )
        self._process.start()
        theirs.close()  # the child has its copy; ours alone must see it close
        self._link = Link(ours)
        self._host: TransportHost | None = None
        self._lock = threading.Lock()
        self._watching = False
        self._stopped = False
        self._failed = False
        self._booted = False

    @property
    def pid(self) -> int | None:
        """Return the child's process id."""
        return self._process.pid

    @property
    def failed(self) -> bool:
        """Return whether the child ended without being asked to."""
        if self._host is None:
            return not self._process.is_alive()
        return self._failed

    @property
    def exitcode(self) -> int | None:
        """Return the child's exit status once it has ended (waits briefly for it)."""
        self._process.join(timeout=1)
        return self._process.exitcode

    def wait_booted(self, timeout: float = 120.0) -> OffloadedProcess:
        """Wait until the child has imported its target; return self.

        Connect only after this: a resumed session starts delivering at once,
        and its messages wait unhandled until the child subscribes.

        Raises
        ------
        OffloadError
            The child exited, or did not boot within ``timeout``.
        """
        if self._booted:
            return self
        ready, _, _ = select.select([self._link], [], [], timeout)
        frame = self._link.receive() if ready else None
        if frame is None or frame.kind is not Kind.HELLO:
            self.stop(timeout=1)
            raise OffloadError(f"the offloaded process did not boot (exit {self.exitcode})")
        self._booted = True
        return self

    def serve(self, transport: Transport, timeout: float = 120.0) -> OffloadedProcess:
        """Hand ``transport`` to the child and wait until its target started; return self.

        Raises
        ------
        OffloadError
            The child exited, or did not start within ``timeout``.
        """
        self.wait_booted(timeout)
        host = self._host = TransportHost(transport, self._link, on_end=self._ended).start()
        deadline = time.monotonic() + timeout
        while not host.ready.wait(0.05):
            if host.ended.is_set() or time.monotonic() > deadline:
                break
        with self._lock:
            # From here on a death is reported through on_exit; before, by raising.
            self._watching = host.ready.is_set() and not host.ended.is_set()
        if not self._watching:
            self.stop(timeout=1)
            raise OffloadError(f"the offloaded process did not start (exit {self.exitcode})")
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the child has ended; return whether it has."""
        self._process.join(timeout)
        return not self._process.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the child to finish its running handler and exit; kill it if it does not."""
        self._stopped = True
        if self._host is not None:
            self._host.stop(timeout)
        else:
            self._link.shutdown()
        self._process.join(timeout)
        if self._process.is_alive():
            log.warning("the offloaded process did not stop in %g s; killing it", timeout)
            self._process.kill()
            self._process.join(5)
        self._link.close()

    def _ended(self, asked: bool) -> None:
        with self._lock:
            self._failed = not asked and not self._stopped
            unexpected = self._failed and self._watching
        if unexpected and self._on_exit is not None:
            self._on_exit()


def _child_main(
    sock: socket.socket, target: Callable[..., None], kwargs: dict[str, Any], level: int
) -> None:
    """Run in the child: start ``target`` on a proxy, then serve until told to stop."""
    # The parent owns the lifecycle: a terminal's Ctrl-C reaches the whole
    # process group, and the parent stops the child in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=level, format=LOG_FORMAT, force=True)
    _watch_parent()
    link = Link(sock)
    link.send(Frame(Kind.HELLO))  # unpickling ``target`` imported its module
    transport = ProxyTransport(link)
    try:
        target(transport, **kwargs)
        transport.ready()
        stopped = transport.serve()
    finally:
        transport.close()
    if not stopped:
        _orphaned()


def _watch_parent() -> None:
    """Exit as soon as the parent dies, even in the middle of a long handler."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    sentinel = parent.sentinel  # a pipe the parent holds open: readable at its death

    def watch() -> None:
        select.select([sentinel], [], [])
        _orphaned()

    threading.Thread(target=watch, name="fedmq-offload-parent", daemon=True).start()


def _orphaned() -> None:
    """Exit at once: the parent is gone, and with it every ack this process could send."""
    log.error("the process holding the transport is gone; exiting")
    os._exit(ORPHANED_EXIT)
