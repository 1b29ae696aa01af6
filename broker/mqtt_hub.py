"""Many MQTT clients in one process: one selector thread drives them all.

``MqttTransport`` gives every client paho's own network thread and a
dispatcher thread; select() then fails above ~340 clients in one process. A
hub drives thousands through paho's external-loop API (``loop_read``,
``loop_write``, ``loop_misc`` on an epoll selector). Threads, whatever the
number of clients:

- one selector thread: every read, write, keep-alive and paho callback;
- a few connector threads: paho opens a socket with a blocking TCP (and TLS)
  handshake, so attempts run there, at most ``max_connecting`` at a time from
  the attempt to the broker's CONNACK (Mosquitto's listen backlog is 100);
- a few lane workers: each client's handlers and reconnect listeners run in
  order on its lane (``broker._mqtt_hub_lanes``), never on the selector thread,
  so a handler may publish and wait for the PUBACK.

Each client is a ``HubClient`` (a ``Transport``) with the MQTT transport's
behaviour; see ``broker.mqtt`` and ``broker._mqtt_hub_client``. A process
holds one socket per client: the hub raises the soft limit on open files to
the hard one and refuses, with a clear error, a client beyond it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import queue
import selectors
import threading
import time
import uuid
from collections import deque
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

from broker._mqtt_hub_client import HubClient, abort_socket
from broker._mqtt_hub_lanes import Lanes
from broker._mqtt_hub_limits import raise_open_files_limit, socket_capacity, too_many_message
from broker._mqtt_hub_loop import EventLoop
from broker._mqtt_options import MqttOptions
from broker._urls import MQTT_SCHEMES, with_session_expiry
from broker.connect import connect
from broker.errors import TransportError
from broker.transport import Transport, Will

__all__ = ["HubClient", "HubPool", "MqttHub", "raise_open_files_limit"]

log = logging.getLogger(__name__)

KEEP_ALIVE_CHECK_S = 1.0
"""How often every connection's keep-alive is looked at (a ping sent when due)."""

_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE


class MqttHub(EventLoop):
    """One network thread driving many MQTT clients; ``open`` one per device.

    Parameters
    ----------
    max_connecting
        Connection attempts under way at once, from the TCP connect to the
        broker's CONNACK.
    workers
        Threads running the clients' handlers (each client's in order).
    connectors
        Threads opening sockets (a TCP connect blocks for a round trip).
    name
        Prefix of the hub's thread names.
    """

    def __init__(
        self,
        *,
        max_connecting: int = 64,
        workers: int = 4,
        connectors: int = 2,
        name: str = "fedmq-mqtt-hub",
    ) -> None:
        super().__init__(name)
        self._capacity = socket_capacity(raise_open_files_limit())
        self._max_connecting = max(1, max_connecting)
        self._writers: deque[HubClient] = deque()  # appended by any thread
        self._waiting: deque[HubClient] = deque()  # hub thread: queued for an attempt
        self._connecting = 0  # hub thread: attempts under way
        self._lock = threading.Lock()
        self._clients: set[HubClient] = set()
        self._options: dict[str, MqttOptions] = {}
        self._stopping = False
        self._halted = False
        self._lanes = Lanes(workers, f"{name}-lane")
        self._attempts: queue.SimpleQueue[HubClient | None] = queue.SimpleQueue()
        self._connectors = [
            threading.Thread(target=self._connector, name=f"{name}-connect-{i}", daemon=True)
            for i in range(max(1, connectors))
        ]
        self.call_later(KEEP_ALIVE_CHECK_S, self._keep_alive)
        self._thread.start()
        for thread in self._connectors:
            thread.start()

    # -- the public surface ----------------------------------------------------

    def open(
        self, url: str, *, client_id: str | None = None, will: Will | None = None
    ) -> HubClient:
        """Return a client of the broker at ``url``; it connects in the background.

        Parameters
        ----------
        url
            ``mqtt://`` or ``mqtts://``, with the options ``MqttTransport`` takes.
        client_id
            The MQTT client id (a persistent session); overrides the URL's.
        will
            ``(topic, frame)`` the broker publishes if the client vanishes.

        Raises
        ------
        TransportError
            The URL is malformed, the hub is closed, or the process cannot open
            another socket (its limit on open files).
        """
        options = self._parse(url, client_id)
        client = HubClient(self, self._lanes.lane(), options, will)  # no socket yet
        with self._lock:
            if self._stopping:
                raise TransportError("the MQTT hub is closed")
            if len(self._clients) >= self._capacity:
                raise TransportError(too_many_message(self._capacity))
            self._clients.add(client)
        self.post(lambda: self._queue_attempt(client))
        return client

    def check_room(self, more: int) -> None:
        """Raise ``TransportError`` now if ``more`` clients would not fit in this process."""
        with self._lock:
            if len(self._clients) + more > self._capacity:
                raise TransportError(
                    f"{more} more clients do not fit: " + too_many_message(self._capacity)
                )

    @property
    def clients(self) -> int:
        """Return how many clients are open."""
        with self._lock:
            return len(self._clients)

    @property
    def capacity(self) -> int:
        """Return how many clients this process has open files for."""
        return self._capacity

    def wait_connected(self, timeout: float) -> int:
        """Wait until every open client connected once (or failed); return how many did not."""
        deadline = time.monotonic() + timeout
        with self._lock:
            clients = list(self._clients)
        missing = 0
        for client in clients:
            try:
                client.wait_connected(max(deadline - time.monotonic(), 0.0))
            except TransportError:
                missing += 1
        return missing

    def close(self, timeout: float = 10.0) -> None:
        """Disconnect every client cleanly (no wills) and stop the hub's threads. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            clients = list(self._clients)
        for client in clients:
            client._mark_closed()
            client._lane.close(timeout=0)  # queued deliveries stay with the broker
            self.drop(client)
        deadline = time.monotonic() + timeout
        while self.clients and time.monotonic() < deadline:
            time.sleep(0.01)
        self._halted = True  # whatever did not disconnect in time is abandoned
        for _ in self._connectors:
            self._attempts.put(None)
        self._close_loop(max(deadline - time.monotonic(), 0.5))
        self._lanes.stop()
        for thread in self._connectors:
            thread.join(max(deadline - time.monotonic(), 0.5))

    # -- what clients ask of the hub (HubClient's Driver) -----------------------

    def on_hub_thread(self) -> bool:
        """Return whether the caller is the hub's network thread."""
        return self.on_loop_thread()

    def want_write(self, client: HubClient) -> None:
        """Send what paho queued for ``client`` on the hub thread, soon."""
        self._writers.append(client)
        if not self.on_loop_thread():
            self._wake()

    def unregister(self, client: HubClient, sock: Any) -> None:
        """Stop polling ``sock``, which paho closes next (hub thread)."""
        if client._sock is sock:
            client._sock, client._mask = None, 0
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        if client._closed:
            self.forget(client)

    def answered(self, client: HubClient) -> None:
        """Count ``client``'s attempt as over and start the next queued one (hub thread)."""
        if client._pending:
            client._pending = False
            self._connecting -= 1
            self._start_attempts()

    def reconnect_later(self, client: HubClient, delay_s: float) -> None:
        """Queue ``client`` for an attempt after ``delay_s`` seconds."""
        self.post(lambda: self.call_later(delay_s, lambda: self._queue_attempt(client)))

    def drop(self, client: HubClient) -> None:
        """Disconnect ``client`` cleanly, on the hub thread; forget it once its socket is gone."""
        self.post(lambda: self._drop(client))

    def forget(self, client: HubClient) -> None:
        """Let go of ``client``: no socket, no further attempts."""
        with self._lock:
            self._clients.discard(client)
        client._released_by_hub()

    # -- the hub thread: sockets -------------------------------------------------

    def _finished(self) -> bool:
        return self._halted or (self._stopping and not self._clients and not self._commands)

    def _ready(self, data: Any, events: int) -> None:
        client: HubClient = data
        sock = client._sock
        try:
            if events & _READ:
                client._io_read()
            if events & _WRITE and client._sock is sock:
                self._write(client)
        except Exception:  # one broken client must not stop the others
            log.exception("MQTT hub: %s failed; dropping its connection", client.client_id)
            abort_socket(sock)

    def _after_events(self) -> None:
        while self._writers:
            client = self._writers.popleft()
            if client._sock is not None:
                try:
                    self._write(client)
                except Exception:
                    log.exception("MQTT hub: writing for %s failed", client.client_id)
                    abort_socket(client._sock)

    def _write(self, client: HubClient) -> None:
        """Send what paho queued; poll for writability only while the socket is full."""
        more = client._io_write()
        sock = client._sock
        if sock is None:
            return
        mask = _READ | _WRITE if more else _READ
        if mask != client._mask:
            client._mask = mask
            self._selector.modify(sock, mask, client)

    def _keep_alive(self) -> None:
        for key in list(self._selector.get_map().values()):
            client = key.data
            if client is not None:
                try:
                    client._io_misc()
                except Exception:
                    log.exception("MQTT hub: keep-alive of %s failed", client.client_id)
        self.call_later(KEEP_ALIVE_CHECK_S, self._keep_alive)

    # -- the hub thread: connecting ----------------------------------------------

    def _queue_attempt(self, client: HubClient) -> None:
        if client._closed:
            self.forget(client)
            return
        self._waiting.append(client)
        self._start_attempts()

    def _start_attempts(self) -> None:
        while self._waiting and self._connecting < self._max_connecting:
            client = self._waiting.popleft()
            if client._closed:
                self.forget(client)
                continue
            client._pending = True
            self._connecting += 1
            self._attempts.put(client)

    def _connector(self) -> None:
        while (client := self._attempts.get()) is not None:
            error = client._connect_once()
            self.post(functools.partial(self._attempted, client, error))

    def _attempted(self, client: HubClient, error: Exception | None) -> None:
        """Take over the socket a connector opened, or retry (hub thread)."""
        sock = client._client.socket()
        if error is not None or sock is None:
            self.answered(client)
            if client._closed:
                self.forget(client)
            else:
                client._attempt_failed(error or TransportError("no socket"))
            return
        client._sock, client._mask = sock, _READ
        self._selector.register(sock, _READ, client)
        if client._closed:
            client._client.disconnect()
        self._write(client)  # the CONNECT (and the DISCONNECT of a client closed meanwhile)
        attempt = client._tries
        timeout = client._options.connect_timeout
        self.call_later(timeout, lambda: self._connack_overdue(client, attempt))

    def _connack_overdue(self, client: HubClient, attempt: int) -> None:
        if client._pending and client._tries == attempt and client._sock is not None:
            log.info("MQTT hub: no CONNACK for %s; dropping the attempt", client.client_id)
            abort_socket(client._sock)

    def _drop(self, client: HubClient) -> None:
        if client._sock is not None:
            client._client.disconnect()  # queues DISCONNECT; paho closes the socket once sent
        elif not client._pending:
            self.forget(client)  # a connector that holds it forgets it when done

    # -- options -----------------------------------------------------------------

    def _parse(self, url: str, client_id: str | None) -> MqttOptions:
        """Parse ``url`` once per hub whatever its login (a TLS context loads once)."""
        parts = urlsplit(url)
        bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        with self._lock:
            base = self._options.get(bare)
            if base is None:
                base = self._options[bare] = MqttOptions.parse(bare)
        if parts.username:
            base = dataclasses.replace(
                base,
                username=unquote(parts.username),
                password=unquote(parts.password) if parts.password else None,
            )
        if client_id:
            return dataclasses.replace(base, client_id=client_id, persistent=True)
        if base.persistent:
            return base  # the URL names the client
        return dataclasses.replace(base, client_id=f"fedmq-{uuid.uuid4().hex[:12]}")


class HubPool:
    """Opens the transports of a process's many clients: MQTT ones share one ``MqttHub``.

    Called like the compositions' transport pools: ``pool(client_id, will, login)``
    returns a connected ``Transport`` (``mqtt://``: a ``HubClient``, connecting in
    the background; ``memory://``: one bus shared by every caller; any other
    scheme: ``broker.connect``), and ``close()`` closes them all.

    Parameters
    ----------
    broker_url
        The broker every client connects to.
    session_expiry_s
        How long an MQTT broker keeps the session of a client that went away
        (the URL's own setting otherwise).
    hub
        The hub to open MQTT clients on (default: one of its own, closed with the pool).
    **hub_options
        ``MqttHub``'s settings for a hub of its own (``max_connecting``, ``workers``, ...).
    """

    def __init__(
        self,
        broker_url: str,
        *,
        session_expiry_s: int | None = None,
        hub: MqttHub | None = None,
        **hub_options: Any,
    ) -> None:
        scheme = urlsplit(broker_url).scheme
        self._url = with_session_expiry(broker_url, session_expiry_s)
        self._own_hub = hub is None and scheme in MQTT_SCHEMES
        self.hub = MqttHub(**hub_options) if self._own_hub else hub
        self._shared: Transport | None = connect(broker_url) if scheme == "memory" else None
        self.opened: list[Transport] = []

    def __call__(
        self, client_id: str, will: Will | None = None, login: Login | None = None
    ) -> Transport:
        """Return the transport of ``client_id``, with its last will and broker login."""
        if self._shared is not None:
            return self._shared
        url = self._url if login is None else login.url_for(self._url)
        if self.hub is not None:
            transport: Transport = self.hub.open(url, client_id=client_id, will=will)
        else:
            transport = connect(url, client_id=client_id, will=will)
        self.opened.append(transport)
        return transport

    def close(self) -> None:
        """Close every transport opened, and the hub if it is the pool's own."""
        if self._own_hub and self.hub is not None:
            self.hub.close()
        for transport in reversed(self.opened):
            transport.close()
        self.opened.clear()
        if self._shared is not None:
            self._shared.close()


class Login(Protocol):
    """A device's own broker login (``broker.access.DeviceCredentials``)."""

    def url_for(self, broker_url: str) -> str:
        """Return ``broker_url`` carrying this login."""
        ...
