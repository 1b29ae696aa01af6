"""An MQTT broker that ``fedmq demo`` starts by itself when it is given no broker URL.

Two backends, chosen by what is installed:

- ``mosquitto``: the Mosquitto binary, when one is on the ``PATH`` (or in an
  ``sbin`` folder), spawned as a child process on a free loopback port with a
  generated config. Preferred: it speaks MQTT 5 (shared subscriptions, so the
  demo runs exactly as production does) and is far faster than the fallback.
- ``amqtt``: the pure-Python broker, run in-process on a background thread with
  its own event loop, so a user needs nothing but ``pip``. It speaks only MQTT
  3.1.1, so its ``url`` carries ``?protocol=3.1.1``; groups then compete only
  inside one process, which a single-aggregator demo does not notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import getpass
import logging
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from broker.errors import TransportError

__all__ = ["EmbeddedBroker", "find_mosquitto"]

log = logging.getLogger(__name__)

Backend = Literal["auto", "mosquitto", "amqtt"]
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_SBIN = "/usr/sbin:/usr/local/sbin:/opt/homebrew/sbin"

_MOSQUITTO_CONF = """\
# Written by FedMQ's EmbeddedBroker for one demo run; removed when it stops.
listener {port} 127.0.0.1
allow_anonymous true
# Running as ourselves keeps the broker able to use this folder.
user {user}
persistence false
# Mosquitto silently drops QoS 1 messages for a client beyond this queue.
max_queued_messages 100000
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
"""


def find_mosquitto() -> str | None:
    """Return the path of a ``mosquitto`` binary, or ``None`` when there is none."""
    return shutil.which("mosquitto") or shutil.which("mosquitto", path=_SBIN)


class EmbeddedBroker:
    """A throwaway MQTT broker on 127.0.0.1; a context manager.

    Parameters
    ----------
    backend
        ``auto`` (Mosquitto when installed, else amqtt), ``mosquitto`` or ``amqtt``.
    startup_timeout
        Seconds to wait for the broker to accept connections.
    """

    def __init__(self, backend: Backend = "auto", *, startup_timeout: float = 10.0) -> None:
        if backend == "auto":
            backend = "mosquitto" if find_mosquitto() else "amqtt"
        self.backend: Literal["mosquitto", "amqtt"] = backend
        self._timeout = startup_timeout
        self._server: _MosquittoProcess | _AmqttThread | None = None
        self._port = 0

    @property
    def url(self) -> str:
        """Return the URL a transport connects with (``broker.connect(url)``)."""
        if self._server is None:
            raise TransportError("the embedded broker is not running")
        query = "?protocol=3.1.1" if self.backend == "amqtt" else ""
        return f"mqtt://127.0.0.1:{self._port}{query}"

    @property
    def port(self) -> int:
        """Return the loopback port the broker listens on (0 before ``start``)."""
        return self._port

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections; return ``self``.

        Raises
        ------
        TransportError
            The backend is missing or did not come up within ``startup_timeout``.
        """
        if self._server is not None:
            return self
        # A port found free can be taken before the broker binds it; try a few.
        for attempt in range(3):
            port = _free_port()
            server = _MosquittoProcess() if self.backend == "mosquitto" else _AmqttThread()
            try:
                server.start(port, self._timeout)
            except _PortTaken:
                log.debug("port %d was taken (attempt %d)", port, attempt + 1)
                continue
            self._server, self._port = server, port
            log.info("embedded %s broker at %s", self.backend, self.url)
            return self
        raise TransportError(f"the embedded {self.backend} broker found no free port")

    def stop(self) -> None:
        """Stop the broker and release its port and files; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class _PortTaken(Exception):
    """The chosen port was bound by someone else first."""


class _MosquittoProcess:
    """Mosquitto as a child process with a config in a temporary folder."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def start(self, port: int, timeout: float) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise TransportError("no mosquitto binary found on PATH or in sbin")
        folder = Path(tempfile.mkdtemp(prefix="fedmq-mosquitto-"))
        conf = folder / "mosquitto.conf"
        conf.write_text(_MOSQUITTO_CONF.format(port=port, user=getpass.getuser()))
        log_path = folder / "mosquitto.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        # Reap the child even if stop() is never called (e.g. an exception).
        finalizer = weakref.finalize(self, _reap, proc, folder)
        if _wait_for_port(port, timeout, alive=lambda: proc.poll() is None):
            self._proc, self._finalizer = proc, finalizer
            return
        output = log_path.read_text(errors="replace").strip()
        finalizer()
        if "Address already in use" in output:
            raise _PortTaken(output)
        raise TransportError(f"mosquitto did not start on port {port}: {output or 'no output'}")

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGTERM it when its parent dies.

    A process killed with SIGKILL runs no finalizer, and an embedded broker
    left behind would keep its port and memory until the machine restarts.
    (Linux ties this to the starting thread: start the broker from a thread
    that lives as long as it is needed, as the command's main thread does.)
    """
    with contextlib.suppress(OSError, AttributeError):  # not Linux: finalizers only
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _reap(proc: subprocess.Popen[bytes], folder: Path) -> None:
    """Terminate ``proc``, wait for it, and remove its folder."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(folder, ignore_errors=True)


class _AmqttThread:
    """amqtt in this process, on a thread that runs its own event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    def start(self, port: int, timeout: float) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise TransportError(
                "no broker to embed: install mosquitto, or amqtt (pip install amqtt)"
            ) from exc
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            # Only anonymous access: no $SYS publisher, no per-packet logging.
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"fedmq-amqtt-{port}", daemon=True
        )
        self._thread.start()

        async def _start() -> None:
            self._broker = Broker(config)
            await self._broker.start()

        started = asyncio.run_coroutine_threadsafe(_start(), self._loop)
        try:
            started.result(timeout)
        except Exception as exc:
            started.cancel()
            self.stop()
            if "address already in use" in str(exc).lower():
                raise _PortTaken(str(exc)) from exc
            raise TransportError(f"amqtt did not start on port {port}: {exc!r}") from exc

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._broker is not None and self._broker.transitions.state == "started":
            shutdown = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            with contextlib.suppress(Exception):
                shutdown.result(timeout=10)
        # Connection handlers still pending would be destroyed noisily with the loop.
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_tasks(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._thread = None
        if not self._loop.is_running():
            self._loop.close()


async def _cancel_tasks() -> None:
    """Cancel every other task on the running loop and wait for them."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _free_port() -> int:
    """Return a loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_port(port: int, timeout: float, *, alive: Callable[[], bool]) -> bool:
    """Return whether 127.0.0.1:``port`` accepts a connection before ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False
