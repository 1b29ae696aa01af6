"""The service's production WSGI server (waitress) on a thread of its own, and its orderly stop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from flask import Flask

T = TypeVar("T")


class HttpServer:
    """A running waitress server and how to stop it without cutting a request."""

    THREADS = 16
    """Requests served at once; the API's calls are short, uploads stream to disk."""
    RECV_BYTES = 1 << 20
    """Bytes read per receive call. Waitress reads 8 KiB by default: a 16 MB update
    took 2,000 trips through its single I/O thread's Python loop, which made
    uploads three times slower (40 uploads of 16 MB: 3.35 s at 8 KiB, 1.17 s)."""

    CONNECTIONS = 1000
    """Connections open at once (waitress's default, 100, turned browsers and fleets away)."""

    def __init__(self, app: Flask, host: str, port: int) -> None:
        """Bind ``host:port`` now; serve from ``start()``.

        ``ServiceError`` when the port cannot be bound (another server holds it).
        """
        import waitress  # only a process that serves HTTP loads it

        from aggregator_service import ServiceError

        # Werkzeug's development server is not for production: waitress is, in pure Python.
        try:
            self._server = waitress.create_server(
                app,
                host=host,
                port=port,
                threads=self.THREADS,
                recv_bytes=self.RECV_BYTES,
                connection_limit=self.CONNECTIONS,
                ident="fedmq",
            )
        except OSError as exc:
            raise ServiceError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
        self.port = int(self._server.effective_port)
        """The bound port (the one the OS chose when asked for port 0)."""
        self._thread = threading.Thread(target=self._server.run, name="fedmq-http", daemon=True)
        self._stopped = False

    def start(self) -> HttpServer:
        """Serve requests on a thread of its own; return self."""
        self._thread.start()
        return self

    def shutdown(self, grace_s: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish, then close every connection.

        Returns once the serving thread has ended, or after ``grace_s``. A second
        call does nothing.
        """
        from waitress import wasyncore

        if self._stopped:
            return
        self._stopped = True
        server = self._server
        deadline = time.monotonic() + grace_s
        # Waitress's channels belong to its loop thread: every change to them runs
        # there, handed over through the server's trigger. The trigger itself is
        # closed last, since a request finishing pulls it.
        self._on_loop(lambda: wasyncore.dispatcher.close(server))  # the listening socket
        # Waitress serves until its last connection closes, and a client's idle
        # keep-alive connection would hold it open for 120 s: close each connection
        # once it is idle, until none is left.
        while time.monotonic() < deadline:
            left = self._on_loop(self._close_idle_connections)
            if not left:  # none, or no loop to ask
                break
            time.sleep(0.05)
        server.task_dispatcher.shutdown(timeout=max(deadline - time.monotonic(), 0.5))
        if self._on_loop(server.trigger.close) is None:
            server.close()  # no loop (never started, or gone): close what is left from here
        if self._thread.is_alive():
            self._thread.join(timeout=max(deadline - time.monotonic(), 0.5))

    def _close_idle_connections(self) -> int:
        """Close the connections with no request to finish or send; return how many are left.

        A request whose headers have not all arrived is no request yet: a client
        that sends them slowly does not hold the shutdown for its whole grace.
        """
        busy = 0
        for channel in list(self._server.active_channels.values()):
            reading = channel.request is not None and channel.request.headers_finished
            if not channel.requests and not reading and not channel.total_outbufs_len:
                channel.will_close = True  # closed by the loop's next pass
            else:
                busy += 1
        return busy + sum(1 for c in self._server.active_channels.values() if c.will_close)

    def _on_loop(self, job: Callable[[], T]) -> T | None:
        """Run ``job`` on the server's loop thread; return its result (None: no loop)."""
        done = threading.Event()
        result: list[Any] = []

        def thunk() -> None:
            try:
                result.append(job())
            finally:
                done.set()

        if not self._thread.is_alive():
            return None
        self._server.trigger.pull_trigger(thunk)
        return result[0] if done.wait(2.0) and result else None
