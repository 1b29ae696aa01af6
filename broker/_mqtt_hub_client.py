"""One client of the MQTT hub: an ``MqttSession`` whose network the hub drives.

Who runs what:

- the hub's selector thread reads, writes and keeps the connection alive
  (``_io_*``) and so runs every paho callback;
- a connector thread opens the socket (``_connect_once``: TCP, TLS, CONNECT), since
  paho's ``reconnect`` blocks until the broker answers the TCP handshake;
- the client's lane, on the hub's small worker pool, runs its handlers and
  reconnect listeners in order, so a handler may publish and wait for the PUBACK;
- any thread may publish, subscribe and settle: paho queues the packet and
  calls ``_on_want_write``, which asks the hub thread to send it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker._mqtt_hub_lanes import Lane
from broker._mqtt_options import MqttOptions
from broker._mqtt_routing import MqttDelivery, MqttSubscription
from broker._mqtt_routing import _call as run_handler
from broker._mqtt_wire import connect_options, first_connect_error
from broker.connect import is_permanent_tls_failure
from broker.errors import BrokerError, ConnectionLost, TransportError
from broker.mqtt import MqttSession
from broker.retry import backoff
from broker.transport import Handler, ReconnectListener, Will

log = logging.getLogger("broker.mqtt_hub")


class Driver(Protocol):
    """What a client asks of the hub that drives it."""

    def on_hub_thread(self) -> bool:
        """Return whether the caller is the hub's network thread."""
        ...

    def want_write(self, client: HubClient) -> None:
        """Send what paho queued for ``client`` (any thread)."""
        ...

    def unregister(self, client: HubClient, sock: Any) -> None:
        """Stop polling ``sock``: paho is about to close it."""
        ...

    def answered(self, client: HubClient) -> None:
        """Count ``client``'s connection attempt as over (hub thread)."""
        ...

    def reconnect_later(self, client: HubClient, delay_s: float) -> None:
        """Queue ``client`` for another connection attempt after ``delay_s``."""
        ...

    def drop(self, client: HubClient) -> None:
        """Disconnect ``client`` cleanly (no will) and forget it."""
        ...

    def forget(self, client: HubClient) -> None:
        """Let go of a client that has no connection and will not get one."""
        ...


class HubClient(MqttSession):
    """One MQTT client on a hub; a ``Transport``. Open it with ``MqttHub.open``.

    It connects in the background: ``publish`` and ``subscribe`` first wait for
    the first connection (``wait_connected``), and raise its error if it never
    came. Everything else is ``MqttTransport``'s behaviour (see ``broker.mqtt``):
    QoS 1, PUBACK waits, renewed subscriptions, back-off, the last will.
    """

    def __init__(self, hub: Driver, lane: Lane, options: MqttOptions, will: Will | None) -> None:
        super().__init__(options, will)
        self._hub = hub
        self._lane = lane
        self._failure: BrokerError | None = None  # why the first connection never came
        self._first_try = 0.0  # when the first attempt started
        self._tries = 0  # attempts started; a CONNACK timer names the one it watches
        self._pending = False  # hub thread: an attempt is under way
        self._sock: Any = None  # hub thread: the socket the selector polls
        self._mask = 0  # hub thread: the events it polls for
        self._released = False  # the hub let go of it
        client = self._client
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_want_write
        kwargs = connect_options(options) if self._v5 else {}
        try:
            client.connect_async(options.host, options.port, options.keepalive, **kwargs)
        except ValueError as exc:
            raise TransportError(f"cannot connect to {self.url}: {exc}") from exc

    def publish(self, topic: str, body: bytes) -> None:
        """Publish ``body`` at QoS 1; return once the broker acknowledged it."""
        self.wait_connected()
        super().publish(topic, body)

    def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish every ``(topic, body)`` at QoS 1, all in flight at once, until each is acked."""
        self.wait_connected()
        super().publish_many(messages)

    def subscribe(
        self, topic: str, handler: Handler, *, group: str | None = None
    ) -> MqttSubscription:
        """Call ``handler`` on this client's lane for each message matching ``topic``."""
        self.wait_connected()
        return super().subscribe(topic, handler, group=group)

    def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the first connection is up; raise why it never came.

        Parameters
        ----------
        timeout
            Seconds to wait (default: the URL's ``publish_timeout``): a hub
            opening thousands of clients paces them, so this may be longer than
            one connection's ``connect_timeout``.

        Raises
        ------
        ConnectionLost
            No broker answered within ``connect_timeout`` of the first attempt,
            or the hub had not connected the client within ``timeout``.
        TlsError
            The broker's certificate did not verify, or it refused ours.
        TransportError
            The broker refused the client for good.
        """
        if self._hub.on_hub_thread():
            raise TransportError("waiting for a connection on the hub's own thread")
        limit = self._options.publish_timeout if timeout is None else timeout
        with self._lock:
            self._lock.wait_for(
                lambda: self._connected_at > 0.0 or self._failure is not None or self._closed,
                limit,
            )
            failure, connected = self._failure, self._connected_at > 0.0
        if failure is not None:
            raise failure
        if not connected and not self._closed:
            raise ConnectionLost(f"{self.url}: {self.client_id} not connected after {limit:g} s")

    def close(self) -> None:
        """Disconnect cleanly (no will); unacked messages stay with the broker. Idempotent."""
        if not self._mark_closed():
            return
        # The running handler may still ack before the DISCONNECT goes out.
        self._lane.close()
        self._hub.drop(self)
        if not self._hub.on_hub_thread():
            with self._lock:
                self._lock.wait_for(lambda: self._released, self._options.connect_timeout)

    def abort(self) -> None:
        """Drop the connection without a DISCONNECT, as a crash would: the broker sends the will.

        The client then reconnects, as after any lost connection.
        """
        sock = self._client.socket()
        if sock is not None:
            abort_socket(sock)

    # -- MqttSession's hooks ---------------------------------------------------

    def _submit(self, handler: Handler, delivery: MqttDelivery) -> None:
        self._lane.submit(functools.partial(run_handler, handler, delivery))

    def _reconnected(self, listeners: list[ReconnectListener]) -> None:
        for listener in listeners:
            self._lane.submit(functools.partial(_notify, listener))

    def _retry(self, attempt: int) -> None:
        if self._closed:
            self._hub.forget(self)
            return
        failure = self._first_failure()
        if failure is None:
            self._hub.reconnect_later(self, backoff(attempt))
            return
        with self._lock:
            self._failure = failure
            self._closed = True
            self._lock.notify_all()
        self._lane.close(timeout=0)
        self._hub.forget(self)

    def _first_failure(self) -> BrokerError | None:
        """Return why to stop trying, if this client never connected and never will."""
        with self._lock:
            if self._connected_at > 0.0:
                return None  # connected before: keep trying for as long as it is open
            refused, tls = self._refused, self._tls_failure
        late = time.monotonic() - self._first_try >= self._options.connect_timeout
        if refused is None and not late and not (tls and is_permanent_tls_failure(tls)):
            return None
        return first_connect_error(
            self._options, refused=refused, tls=tls, answered=self._socket_opened and self._v5
        )

    # -- paho callbacks (hub thread) ----------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        super()._on_connect(client, userdata, flags, reason, properties)
        self._hub.answered(self)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._hub.answered(self)
        super()._on_disconnect(client, userdata, flags, reason, properties)

    def _on_socket_close(self, client: paho.Client, userdata: object, sock: Any) -> None:
        self._hub.unregister(self, sock)

    def _on_want_write(self, client: paho.Client, userdata: object, sock: Any) -> None:
        self._hub.want_write(self)

    # -- driven by the hub -----------------------------------------------------------

    def _connect_once(self) -> Exception | None:
        """Open a socket and send CONNECT (connector thread); return what failed."""
        with self._lock:
            if self._closed:
                return None
            self._first_try = self._first_try or time.monotonic()
            self._tries += 1
        try:
            # Holding paho's message lock keeps a publish from another thread out
            # of the gap between the new socket and its CONNECT: sent first, it
            # would make the broker drop the connection.
            with self._client._out_message_mutex:
                self._client.reconnect()
        except Exception as exc:  # refused, unreachable, TLS: all retried with back-off
            return exc
        return None

    def _attempt_failed(self, error: Exception) -> None:
        """Record a failed attempt and retry, or give up (hub thread)."""
        if isinstance(error, ssl.SSLError):
            self._on_tls_failure(error)
        log.debug("%s: connection attempt failed: %s", self.client_id, error)
        self._on_connect_fail(self._client, None)

    def _mark_closed(self) -> bool:
        """Refuse further use; return whether this call closed it."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._lock.notify_all()
        return True

    def _released_by_hub(self) -> None:
        with self._lock:
            self._released = True
            self._lock.notify_all()

    def _io_read(self) -> None:
        """Read what arrived; TLS may hold decrypted bytes the selector cannot see."""
        rc = self._client.loop_read()
        sock = self._client.socket()
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and _pending(sock):
            rc = self._client.loop_read()

    def _io_write(self) -> bool:
        """Send what is queued; return whether more waits for the socket to drain."""
        self._client.loop_write()
        # Checked after loop_write returns, not inside it: a packet queued by
        # another thread while paho was clearing its write flag is seen here.
        return self._client.want_write()

    def _io_misc(self) -> None:
        """Send a keep-alive ping when due; notice a broker that stopped answering."""
        self._client.loop_misc()


def abort_socket(sock: Any) -> None:
    """Shut ``sock`` down so that paho's next read fails and runs its lost-connection path."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _pending(sock: Any) -> bool:
    pending = getattr(sock, "pending", None)
    return pending is not None and int(pending()) > 0


def _notify(listener: ReconnectListener) -> None:
    try:
        listener()
    except Exception:
        log.exception("a reconnect listener failed")
