"""Opening transports for the compositions: one shared bus in-process, connections otherwise."""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING

from broker import MemoryTransport, Transport, connect
from broker.access import DeviceCredentials
from broker.connect import is_in_process, with_session_expiry
from fedmq.http_server import HttpServer

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)


Will = tuple[str, bytes]
"""A last will: the topic and the signed frame the broker sends when a connection dies."""


Opener = Callable[[str, Will | None, DeviceCredentials | None], Transport]
"""Opens a connection for a client id, with its last will and its own broker login."""


def transport_factory(broker_url: str, *, session_expiry_s: int | None = None) -> Opener:
    """Return ``open(client_id, will, login)``: every caller shares one bus for ``memory://``.

    Connections get the client id (MQTT: a persistent session), the last will
    (MQTT: a device's signed check-out) and, for a device whose broker user
    the service provisioned, that login instead of the URL's.
    ``session_expiry_s`` shortens how long the broker keeps an MQTT session
    of a client that went away (the URL's own setting otherwise).
    """
    if is_in_process(broker_url):
        shared = MemoryTransport()

        def the_bus(
            _client_id: str, _will: Will | None = None, _login: DeviceCredentials | None = None
        ) -> Transport:
            return shared

        return the_bus
    url = with_session_expiry(broker_url, session_expiry_s)

    def open_transport(
        client_id: str, will: Will | None = None, login: DeviceCredentials | None = None
    ) -> Transport:
        target = url if login is None else login.url_for(url)
        return connect(target, client_id=client_id, will=will)

    return open_transport


def unique_client_id(role: str) -> str:
    """Return a fresh client id for a server-side component."""
    return f"fedmq-{role}-{uuid.uuid4().hex[:8]}"


class Ticker:
    """Calls ``tick`` every ``interval_s`` on a daemon thread until stopped."""

    def __init__(self, tick: Callable[[], None], interval_s: float = 0.25) -> None:
        self._tick = tick
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedmq-ticker", daemon=True)

    def start(self) -> Ticker:
        """Start ticking; return self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop ticking and wait for the thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._tick()
            except Exception:  # one failed tick must not end deadline enforcement
                log.exception("periodic task failed; retrying at the next tick")


def executor_runner(executor: Executor) -> Callable[[Callable[[], None]], None]:
    """Return a runner that trains on ``executor`` and logs what a job raises."""

    def job_failed(future: Future[None]) -> None:
        error = future.exception() if not future.cancelled() else None
        if error is not None:
            log.error("a training job failed", exc_info=error)

    def run(job: Callable[[], None]) -> None:
        executor.submit(job).add_done_callback(job_failed)

    return run


def start_http(app: Flask, host: str, port: int) -> HttpServer:
    """Serve ``app`` on a daemon thread; return the server (``.port``, ``.shutdown()``)."""
    return HttpServer(app, host, port).start()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (for in-process HTTP services)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class TransportPool:
    """Opens transports by client id (see ``transport_factory``) and closes them all at the end."""

    def __init__(self, broker_url: str, *, session_expiry_s: int | None = None) -> None:
        self._open = transport_factory(broker_url, session_expiry_s=session_expiry_s)
        self.opened: list[Transport] = []

    def __call__(
        self, client_id: str, will: Will | None = None, login: DeviceCredentials | None = None
    ) -> Transport:
        """Return the transport for ``client_id`` (the shared one in-process)."""
        transport = self._open(client_id, will, login)
        if transport not in self.opened:
            self.opened.append(transport)
        return transport

    def close(self) -> None:
        """Close every transport opened, last first."""
        for transport in reversed(self.opened):
            transport.close()
        self.opened.clear()
