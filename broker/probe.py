"""Whether a broker URL's server accepts connections: a cheap check for readiness probes.

It opens (and closes) a TCP connection to the URL's host and port, so it
answers within its timeout whatever the protocol, without a login. A broker
that is down refuses or times out; the transports' own reconnects are not
disturbed.
"""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671, "mqtt": 1883, "mqtts": 8883}


def addresses(url: str) -> list[tuple[str, int]]:
    """Return the ``(host, port)`` pairs a broker URL names (none: an in-process bus).

    A cluster URL names several nodes (``amqp://u:p@h1,h2:5673/vhost``); each
    without a port gets the scheme's default.
    """
    parts = urlsplit(url)
    if parts.scheme == "memory":
        return []
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"not a broker URL: {parts.scheme}://")
    default = DEFAULT_PORTS[parts.scheme]
    found = []
    for node in (n.strip() for n in parts.netloc.rpartition("@")[2].split(",")):
        host, port = node, ""
        if node.startswith("["):  # [IPv6]:port
            host, _, rest = node[1:].partition("]")
            port = rest.removeprefix(":")
        elif ":" in node:
            host, port = node.rsplit(":", 1)
        found.append((host or "127.0.0.1", int(port) if port else default))
    return found


class BrokerProbe:
    """Answers "is the broker up?", asking at most once per ``cache_s``.

    Parameters
    ----------
    url
        The broker URL the process connects with.
    timeout_s
        How long one connection attempt may take.
    cache_s
        How long an answer is reused (a readiness endpoint may be polled hard).
    """

    def __init__(self, url: str, *, timeout_s: float = 1.0, cache_s: float = 1.0) -> None:
        self._addresses = addresses(url)
        self._timeout_s = timeout_s
        self._cache_s = cache_s
        self._lock = threading.Lock()
        self._answer: tuple[float, bool] | None = None

    def __call__(self) -> bool:
        """Return whether a broker node accepted a connection just now (or within ``cache_s``)."""
        if not self._addresses:
            return True
        with self._lock:
            now = time.monotonic()
            if self._answer is not None and now - self._answer[0] < self._cache_s:
                return self._answer[1]
            up = any(self._accepts(node) for node in self._addresses)
            self._answer = (time.monotonic(), up)
            return up

    def _accepts(self, node: tuple[str, int]) -> bool:
        try:
            with socket.create_connection(node, timeout=self._timeout_s):
                return True
        except OSError:
            return False
