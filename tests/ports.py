"""Loopback ports for the servers and brokers tests start, safe with tests side by side.

A port the kernel picks (bind to port 0) comes from Linux's ephemeral range
(32768-60999), which is also where every outgoing connection gets its local
port: between the test closing its probe and the child binding the port, a
broker client of a test running alongside took it ("Address already in use",
seen with two pytest workers). So ports come from below that range, which
also avoids rabbitmqctl's 35672-35682; each pytest-xdist worker (up to 8,
replacements of crashed ones included) draws from a slice of its own, and
no port is handed out twice in one process (a server may take a moment to
bind what it was given).
"""

from __future__ import annotations

import os
import random
import socket

_PORTS = range(20000, 32768)
_SLICES = 8
"""Workers with ports of their own: xdist names a crashed worker's replacement gw2, gw3..."""
_given: set[int] = set()


def _slice() -> range:
    """Return this pytest worker's share of ``_PORTS`` (all of it when not under xdist)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return _PORTS
    size = len(_PORTS) // _SLICES
    start = _PORTS.start + (int(worker[2:]) % _SLICES) * size
    return range(start, start + size)


def free_port() -> int:
    """Return a loopback port nothing listens on, below the ephemeral range."""
    ports = _slice()
    for _ in range(500):
        port = random.choice(ports)
        if port in _given:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        _given.add(port)
        return port
    raise RuntimeError(f"no free port in {ports}")
