"""A TCP forwarder tests put between a client and a real broker, to cut connections at will."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

Frame = tuple[bytes, bool]
"""A whole frame (or packet) a client sent, and whether it acknowledges a delivery."""


class TcpProxy:
    """Forward 127.0.0.1:<port> to a target; ``cut()`` drops every live connection.

    Given the ``protocol`` (``"amqp"`` or ``"mqtt"``) it reads what clients send
    frame by frame, and ``withhold_acks()`` then drops their acknowledgements of
    deliveries (AMQP ``basic.ack``, MQTT PUBACK) and nothing else: a consumer
    goes on receiving and publishing, and the broker still holds every delivery
    it acks from then on, to give again when the connection is cut.
    """

    def __init__(
        self, target_port: int, target_host: str = "127.0.0.1", protocol: str | None = None
    ) -> None:
        self._target = (target_host, target_port)
        self._frames = {None: None, "amqp": _amqp_frames, "mqtt": _mqtt_frames}[protocol]
        self.withholding = False
        self.withheld = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._closed:
                client.close()
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # the connect timeout must not cut idle connections
            for s in (client, upstream):
                # Without it, Nagle delays every small frame (a confirm) by ~40 ms.
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
            for a, b, frames in ((client, upstream, self._frames), (upstream, client, None)):
                threading.Thread(target=self._pipe, args=(a, b, frames), daemon=True).start()

    def _pipe(
        self,
        source: socket.socket,
        sink: socket.socket,
        frames: Callable[[bytearray], list[Frame]] | None,
    ) -> None:
        pending = bytearray()
        try:
            while data := source.recv(65536):
                if frames is None:
                    sink.sendall(data)
                    continue
                pending += data
                for frame, is_ack in frames(pending):
                    if is_ack and self.withholding:
                        with self._lock:
                            self.withheld += 1
                    else:
                        sink.sendall(frame)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def withhold_acks(self) -> None:
        """Drop every acknowledgement of a delivery clients send from now on."""
        if self._frames is None:
            raise ValueError("a proxy that knows no protocol cannot tell acks apart")
        self.withholding = True

    def cut(self) -> None:
        """Drop every connection through the proxy; new ones are still accepted."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        """Stop accepting and drop everything."""
        self._closed = True
        # Closing alone does not wake a thread blocked in accept() on Linux.
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self.cut()


def _amqp_frames(pending: bytearray) -> list[Frame]:
    """Take the whole AMQP 0-9-1 frames off the front of ``pending``.

    A frame is type (1 byte), channel (2), size (4), payload, 0xCE; a method
    frame's payload starts with its class and method ids, 60 and 80 for
    ``basic.ack``. A connection opens with the 8-byte protocol header.
    """
    out: list[Frame] = []
    if pending.startswith(b"AMQP"):
        if len(pending) < 8:
            return out
        out.append((bytes(pending[:8]), False))
        del pending[:8]
    while len(pending) >= 7:
        kind, _channel, size = struct.unpack_from(">BHI", pending)
        end = 7 + size + 1
        if len(pending) < end:
            break
        is_ack = kind == 1 and pending[7:11] == b"\x00\x3c\x00\x50"
        out.append((bytes(pending[:end]), is_ack))
        del pending[:end]
    return out


def _mqtt_frames(pending: bytearray) -> list[Frame]:
    """Take the whole MQTT control packets off the front of ``pending`` (PUBACK: type 4)."""
    out: list[Frame] = []
    while len(pending) >= 2:
        length, shift, at = 0, 0, 1
        while at < len(pending) and at <= 4:
            byte = pending[at]
            length |= (byte & 0x7F) << shift
            shift += 7
            at += 1
            if not byte & 0x80:
                break
        else:
            if at > 4:
                raise OSError("an MQTT remaining length longer than four bytes")
            break  # the length's bytes have not all come
        end = at + length
        if len(pending) < end:
            break
        out.append((bytes(pending[:end]), pending[0] >> 4 == 4))
        del pending[:end]
    return out
