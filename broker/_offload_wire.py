"""Frames between an offloaded process and the process that holds its transport.

One Unix stream socket joins the two. Every frame is a fixed header, a short
UTF-8 ``meta`` string (a topic, a group, an error) and a ``body`` of bytes.
Deliveries travel one way and settlements the other, so the hot path is a
header and a scatter-gather send: no JSON, no pickling, no copy of the body.
"""

from __future__ import annotations

import contextlib
import enum
import socket
import struct
import threading
from dataclasses import dataclass

from broker.errors import TransportError

HEADER = struct.Struct("!BBIQII")
"""kind, flags, channel (subscription), ident (delivery or request), meta length, body length."""

BUFFER_BYTES = 4 << 20
"""Socket buffer asked for (the kernel may cap it): a few updates in flight at once."""


class OffloadError(TransportError):
    """The link to the other process broke, or that process ended."""


class Kind(enum.IntEnum):
    """What a frame carries; the comment names its direction."""

    DELIVER = 1
    """host to child: ``channel`` subscription, ``ident`` delivery, ``flags`` redelivered."""
    REPLY = 2
    """host to child: ``ident`` request; failed: ``flags`` 1, ``meta`` class, ``body`` text."""
    STOP = 3
    """host to child: finish the running handler and exit."""
    READY = 4
    """child to host: the offloaded target has started."""
    PUBLISH = 5
    """child to host: ``ident`` request, ``meta`` topic, ``body`` message."""
    SUBSCRIBE = 6
    """child to host: ``ident`` request, ``channel`` its id, ``meta`` topic, ``body`` group."""
    CANCEL = 7
    """child to host: ``ident`` request, ``channel`` subscription."""
    ACK = 8
    """child to host: ``ident`` delivery."""
    NACK = 9
    """child to host: ``ident`` delivery, ``flags`` 1 to requeue."""
    HELLO = 10
    """child to host, first of all: the target's module is imported."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One message on the link."""

    kind: Kind
    flags: int = 0
    channel: int = 0
    ident: int = 0
    meta: str = ""
    body: bytes = b""


class Link:
    """One end of the socket: whole frames out from any thread, in on one reader thread."""

    def __init__(self, sock: socket.socket) -> None:
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_BYTES)
        self._sock = sock
        # Buffered: a burst of small frames (a checkpoint's acks) is one recv call.
        self._reader = sock.makefile("rb", buffering=1 << 16)
        self._send_lock = threading.Lock()

    def fileno(self) -> int:
        """Return the socket's descriptor (to wait on it with ``select``)."""
        return self._sock.fileno()

    def send(self, frame: Frame) -> None:
        """Write ``frame`` whole; raise ``OffloadError`` if the other end is gone."""
        meta = frame.meta.encode()
        header = HEADER.pack(
            frame.kind, frame.flags, frame.channel, frame.ident, len(meta), len(frame.body)
        )
        parts = [memoryview(header), memoryview(meta), memoryview(frame.body)]
        with self._send_lock:
            try:
                self._send_all(parts)
            except OSError as exc:
                raise OffloadError(f"the other process is gone: {exc}") from exc

    def receive(self) -> Frame | None:
        """Return the next frame, or None once the other end has closed."""
        try:
            header = self._reader.read(HEADER.size)
            if len(header) < HEADER.size:
                return None
            kind, flags, channel, ident, meta_len, body_len = HEADER.unpack(header)
            meta = self._reader.read(meta_len) if meta_len else b""
            body = self._reader.read(body_len) if body_len else b""
        except (OSError, ValueError) as exc:  # ValueError: read after a local close
            raise OffloadError(f"the link to the other process broke: {exc}") from exc
        if len(meta) < meta_len or len(body) < body_len:
            return None  # cut off mid-frame: the other process died while writing
        try:
            return Frame(Kind(kind), flags, channel, ident, meta.decode(), body)
        except ValueError as exc:  # not a frame this code wrote
            raise OffloadError(f"garbled frame on the link: {exc}") from exc

    def shutdown(self) -> None:
        """Stop both directions, which wakes a reader blocked in ``receive``."""
        with contextlib.suppress(OSError):  # already disconnected
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Shut down and release the socket."""
        self.shutdown()
        self._reader.close()
        self._sock.close()

    def _send_all(self, parts: list[memoryview]) -> None:
        """Send every byte of ``parts`` with as few system calls as the kernel allows."""
        while parts:
            sent = self._sock.sendmsg(parts)
            while parts and sent >= len(parts[0]):
                sent -= len(parts[0])
                parts.pop(0)
            if parts and sent:
                parts[0] = parts[0][sent:]
