"""The AMQP transport's I/O thread: the one thread that touches pika.

It alternates between ``process_data_events``, which reads deliveries, confirms
and heartbeats, and draining a deque of commands that other threads append; they
wake it with ``add_callback_threadsafe``, pika's one thread-safe call.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from typing import Any, Protocol

import pika
import pika.adapters.utils.io_services_utils as pika_io
import pika.exceptions as pe

from broker._amqp_commands import Command, Nacked, Retries, resolve
from broker._amqp_nodes import REFUSED, Nodes
from broker._amqp_options import EXCHANGE, AmqpOptions, queue_arguments, topic_of
from broker._amqp_topology import open_publisher
from broker.connect import describe_tls_failure, is_permanent_tls_failure
from broker.errors import ConnectionLost, TlsError, TransportError
from broker.retry import backoff

log = logging.getLogger("broker.amqp")

# pika ships no type information, so its connection and channels are plain Any here.
Channel = Any

# Longest the loop blocks inside pika when idle; a new command wakes it sooner.
_TICK = 1.0

RECV_BYTES = 256 * 1024
"""Bytes pika asks the socket for at once (pika's own default: 4096).

pika appends each read to its frame buffer, a ``bytes`` copied whole on every
append, so a 128 KiB frame read 4 KiB at a time was copied 32 times over.
Measured on the 2-core test machine, a consumer that only acks 400 KB
messages: 1.74 ms of CPU per message and 330-476 msg/s at 4 KiB; 0.77 ms and
966 msg/s at 256 KiB, where RabbitMQ (0.9 ms per message) becomes the limit;
1 MiB read no faster. pika reads the size from its transport class, for
every connection in the process.
"""
pika_io._AsyncTransportBase._MAX_RECV_BYTES = RECV_BYTES


class Consumer(Protocol):
    """What the I/O thread needs from a subscription."""

    topic: str
    key: str
    group: str | None
    queue: str
    """The queue it consumes: its group's, or its own (``PLAIN_PREFIX`` + a random id)."""
    active: bool
    channel: Channel
    """The live channel; written by the I/O thread only, None while disconnected."""

    def deliver(self, channel: Channel, method: Any, properties: Any, body: bytes) -> None:
        """Hand a message to the subscription's dispatcher thread."""

    def stop(self) -> None:
        """Stop the subscription's dispatcher thread."""


class IoThread:
    """Own the connection; run every pika call that other threads ask for."""

    def __init__(
        self, options: AmqpOptions, on_reconnected: Callable[[], None] | None = None
    ) -> None:
        self.options = options
        # Called on this thread after each reconnect, holding no lock: it must not block.
        self._on_reconnected = on_reconnected or _nothing
        self.consumers: list[Consumer] = []  # touched by this thread only while it runs
        self._commands: deque[Command] = deque()
        self._lock = threading.Lock()
        self._accepting = True
        self._failure: ConnectionLost | None = None
        self._stopping = threading.Event()
        self._woken = False
        self._conn: Any = None  # written by this thread; others read it only to wake it
        self._publisher: Channel = None
        self._orphans: list[Channel] = []  # channels whose consumer the broker cancelled
        self._heal_at = 0.0
        self._heal_failures = 0
        self._retries = Retries()
        self._nodes = Nodes(options.addresses)
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._run, name="fedmq-amqp-io", daemon=True)

    def start(self) -> None:
        """Connect on the new thread; raise ``ConnectionLost`` if that fails."""
        self._thread.start()
        self._ready.result()

    def stop(self) -> bool:
        """Finish queued work, disconnect and end the thread; return False if already stopped."""
        with self._lock:
            if self._stopping.is_set():
                return False
            self._stopping.set()
        self._wake(force=True)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        return True

    # -- called from any thread -----------------------------------------------------

    def call(self, run: Callable[[], object], *, retry: bool) -> Any:
        """Run ``run`` on this thread and return its result, waiting up to ``publish_timeout``."""
        future: Future[Any] = Future()
        self._submit(Command(run, future, retry))
        timeout = self.options.publish_timeout
        try:
            return future.result(timeout)
        except TimeoutError:
            if not future.cancel():  # it finished just now
                return future.result()
            raise ConnectionLost(
                f"{self.options.safe_url}: no answer from the broker within {timeout:g} s"
            ) from None

    def settle(self, consumer: Consumer, channel: Channel, action: Callable[..., None]) -> None:
        """Ack or nack on ``channel`` without waiting; a no-op if the channel has died."""
        try:
            self._submit(Command(partial(self._settle_now, consumer, channel, action)))
        except TransportError:
            log.debug("ack/nack after close skipped; the broker requeues the message")

    def _submit(self, command: Command) -> None:
        with self._lock:
            if not self._accepting or self._stopping.is_set():
                raise self._failure or TransportError("transport is closed")
            self._commands.append(command)
        self._wake()

    def _wake(self, force: bool = False) -> None:
        # One pending wake-up is enough: the loop clears the flag before it drains.
        if self._woken and not force:
            return
        self._woken = True
        conn = self._conn
        if conn is not None:
            # Closed or reconnecting: the loop drains as soon as it has reconnected.
            with contextlib.suppress(pe.AMQPError):
                conn.add_callback_threadsafe(_nothing)

    # -- commands, run on this thread ----------------------------------------------

    def publish_now(self, key: str, body: bytes, message_id: str) -> None:
        """Publish persistently and wait for the broker's confirm."""
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, message_id=message_id
        )
        if self._publisher is None or not self._publisher.is_open:
            self._declare_topology()  # a broker error closed it, maybe over a deleted exchange
        try:
            self._publisher.basic_publish(EXCHANGE, key, body, properties=properties)
        except pe.NackError as exc:
            # RabbitMQ nacks what it cannot hand to a queue, as when a quorum queue's
            # leader has just died; and a 3.10 channel that was nacked that way can
            # go on nacking that queue long after a new leader is elected (measured:
            # still after 10 minutes, while a fresh channel got through at once).
            # So the retry goes out on a fresh channel.
            self._publisher.close()
            raise Nacked(f"the broker nacked a message to {topic_of(key)!r}") from exc

    def subscribe_now(self, consumer: Consumer) -> None:
        """Start consuming and remember the consumer for reconnects."""
        if consumer.active:
            self._consume(consumer)
            self.consumers.append(consumer)

    def unsubscribe_now(self, consumer: Consumer) -> None:
        """Forget the consumer and release its channel and, for a plain one, its queue."""
        if consumer in self.consumers:
            self.consumers.remove(consumer)
        self._release(consumer)

    def _release(self, consumer: Consumer) -> None:
        """Close the consumer's channel, which requeues what it had not acked.

        A plain subscription's queue is deleted too: nobody else reads it.
        """
        channel, consumer.channel = consumer.channel, None
        if channel is not None and channel.is_open:
            channel.close()
        if consumer.group is None and self._conn is not None and self._conn.is_open:
            if self._publisher is None or not self._publisher.is_open:
                self._declare_topology()
            self._publisher.queue_delete(consumer.queue)

    def _settle_now(
        self, consumer: Consumer, channel: Channel, action: Callable[..., None]
    ) -> None:
        if channel is not consumer.channel or not channel.is_open:
            log.debug("ack/nack of a delivery from a closed channel skipped; it is redelivered")
            return
        action(channel)

    # -- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._connect(self.options.connect_attempts, first=True)
        except Exception as exc:
            error = _as_transport_error(exc)
            self._finish(error)
            self._ready.set_exception(error)
            return
        self._ready.set_result(None)
        while not self._stopping.is_set():
            try:
                self._serve()
            except Exception as exc:
                if self._stopping.is_set():
                    break
                if not isinstance(exc, pe.AMQPConnectionError):
                    log.exception("unexpected error on the AMQP I/O thread; reconnecting")
                log.warning("lost %s (%r); reconnecting", self.options.safe_url, exc)
                try:
                    self._connect(self.options.max_attempts, first=False)
                except Exception as lost:
                    log.error("giving up on %s: %s", self.options.safe_url, lost)
                    self._finish(_as_transport_error(lost))
                    return
                self._on_reconnected()
        self._finish(TransportError("transport is closed"))

    def _serve(self) -> None:
        while not self._stopping.is_set():
            self._woken = False
            self._drain()
            self._conn.process_data_events(time_limit=self._retries.wait_limit(_TICK))
            self._commands.extend(self._retries.due())
            if time.monotonic() >= self._heal_at:
                self._heal()

    def _heal(self) -> None:
        """Resubscribe consumers whose channel the broker closed or whose queue was deleted."""
        # A channel dies alone when, say, RabbitMQ's consumer_timeout expires on a
        # message held unacked too long; the connection stays up, so no reconnect helps.
        for channel in self._orphans:
            if channel.is_open:
                channel.close()  # the broker requeues what it had not acked
        self._orphans.clear()
        self._heal_at = time.monotonic() + _TICK
        for consumer in self.consumers:
            if consumer.active and (consumer.channel is None or not consumer.channel.is_open):
                log.warning("resubscribing to %s: its channel was closed", consumer.topic)
                try:
                    self._consume(consumer)
                except pe.AMQPChannelError as exc:
                    log.error("cannot resubscribe to %s: %r", consumer.topic, exc)
                    self._heal_at = time.monotonic() + backoff(self._heal_failures)
                    self._heal_failures += 1
                    return
        self._heal_failures = 0

    def _drain(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command.future is not None and command.future.cancelled():
                continue
            try:
                result = command.run()
            except Nacked as exc:
                if command.retry:
                    self._retries.add(command)
                else:
                    resolve(command, exc=TransportError(str(exc)))
            except (pe.AMQPConnectionError, pe.AMQPChannelError) as exc:
                if isinstance(exc, pe.AMQPChannelError) and self._conn.is_open:
                    resolve(command, exc=TransportError(f"the broker refused: {exc!r}"))
                    continue
                if command.retry:
                    self._commands.appendleft(command)
                else:
                    resolve(command, exc=ConnectionLost(f"lost {self.options.safe_url}"))
                raise pe.AMQPConnectionError(f"connection lost: {exc!r}") from exc
            except Exception as exc:
                resolve(command, exc=exc)
            else:
                resolve(command, result=result)

    def _connect(self, attempts: int, *, first: bool) -> None:
        """Open a connection, declare the topology and restore the consumers."""
        self._drop_connection()
        failures = 0
        while True:
            # A reconnect waits even before its first try, so that clients cut off
            # together by a broker restart do not all come back in the same instant.
            waits = failures if not first else failures - 1
            if waits >= 0 and self._stopping.wait(backoff(waits)):
                raise TransportError("transport closed while reconnecting")
            try:
                self._open()
                if not first:
                    log.info(
                        "reconnected to %s (node %s)", self.options.safe_url, self._nodes.current
                    )
                return
            except REFUSED as exc:
                if first:  # wrong credentials or vhost: retrying will not help
                    raise ConnectionLost(
                        f"{self.options.safe_url} refused the login: {exc!r}"
                    ) from exc
                error: Exception = exc
            except ssl.SSLError as exc:
                # pika raises the handshake's own error. A certificate that does not
                # verify fails the first connect at once; a reconnect keeps trying,
                # as the broker's certificate may be being replaced.
                if first and is_permanent_tls_failure(exc):
                    raise TlsError(f"{self.options.safe_url}: {describe_tls_failure(exc)}") from exc
                error = exc
            except (pe.AMQPConnectionError, OSError) as exc:
                error = exc
            except pe.AMQPChannelError as exc:
                self._drop_connection()
                raise TransportError(f"cannot declare FedMQ's exchanges: {exc!r}") from exc
            self._drop_connection()
            failures += 1
            if attempts and failures >= attempts:
                raise ConnectionLost(
                    f"cannot reach {self.options.safe_url} after {failures} attempts: {_why(error)}"
                )
            log.info("connecting to %s failed (%s); retrying", self.options.safe_url, _why(error))

    def _open(self) -> None:
        self._conn = self._nodes.dial()
        self._declare_topology()
        for consumer in list(self.consumers):
            if not consumer.active:
                self.consumers.remove(consumer)
                continue
            try:
                self._consume(consumer)
            except pe.AMQPChannelError as exc:
                # Leave it registered: _heal tries again.
                log.error("cannot restore the subscription to %s: %r", consumer.topic, exc)

    def _drop_connection(self) -> None:
        conn, self._conn, self._publisher = self._conn, None, None
        self._orphans.clear()
        for consumer in self.consumers:
            consumer.channel = None
        if conn is not None and conn.is_open:
            with contextlib.suppress(pe.AMQPError):  # half gone: nothing left to release
                conn.close()

    def _declare_topology(self) -> None:
        """Declare what is missing of the shared topology; open the publishing channel."""
        self._publisher = open_publisher(self._conn, self.options.queue_type)

    def _consume(self, consumer: Consumer) -> None:
        channel = self._conn.channel()
        try:
            channel.basic_qos(prefetch_count=self.options.prefetch)
            arguments = queue_arguments(self.options.queue_type, plain=consumer.group is None)
            channel.queue_declare(consumer.queue, durable=True, arguments=arguments)
            channel.queue_bind(consumer.queue, EXCHANGE, routing_key=consumer.key)
            channel.add_on_cancel_callback(partial(self._on_cancelled, consumer, channel))
            consumer.channel = channel
            channel.basic_consume(consumer.queue, partial(_on_message, consumer), auto_ack=False)
        except pe.AMQPChannelError:
            consumer.channel = None
            if channel.is_open:
                channel.close()
            raise

    def _on_cancelled(self, consumer: Consumer, channel: Channel, _frame: Any) -> None:
        log.warning("the broker cancelled the subscription to %s", consumer.topic)
        if consumer.channel is channel:
            consumer.channel = None
        self._orphans.append(channel)  # closed by the next _heal, outside pika's dispatch
        self._heal_at = 0.0

    def _finish(self, error: TransportError) -> None:
        """Stop accepting work, finish what was queued if still connected, and disconnect."""
        with self._lock:
            self._accepting = False
            if isinstance(error, ConnectionLost):
                self._failure = error
        if self._conn is not None and self._conn.is_open:
            # Acks and publishes handed over before close() still go out.
            with contextlib.suppress(pe.AMQPError):
                self._drain()
                if self._stopping.is_set():  # closed, so no one resumes the plain queues
                    for consumer in self.consumers:
                        if consumer.group is None:
                            self._release(consumer)
        self._commands.extend(self._retries.take_all())
        while self._commands:
            resolve(self._commands.popleft(), exc=error)
        self._drop_connection()
        if self._failure is not None:
            for consumer in self.consumers:
                consumer.stop()


def _on_message(
    consumer: Consumer, channel: Channel, method: Any, properties: Any, body: bytes
) -> None:
    consumer.deliver(channel, method, properties, body)


def _why(error: Exception) -> str:
    """Return a connect failure in one line; TLS errors in words rather than OpenSSL's."""
    return describe_tls_failure(error) if isinstance(error, ssl.SSLError) else repr(error)


def _as_transport_error(exc: Exception) -> TransportError:
    return exc if isinstance(exc, TransportError) else ConnectionLost(repr(exc))


def _nothing() -> None:
    """Do nothing; scheduling it is how other threads wake the loop."""
