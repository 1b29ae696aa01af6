"""MQTT packet details the transport needs from paho: properties, sizes, incoming messages."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from broker._mqtt_options import MqttOptions
from broker._mqtt_routing import REDELIVERED_PROPERTY, Inbound
from broker.connect import describe_tls_failure, is_permanent_tls_failure
from broker.errors import ConnectionLost, TlsError, TransportError

RECEIVE_MAXIMUM = 65_535
"""Unacked messages the broker may have in flight to us (the MQTT 5 maximum)."""

# CONNACK refusals worth retrying; any other one (bad credentials, banned,
# unsupported protocol) will not change by asking again.
TRANSIENT_REFUSALS = frozenset({0x88, 0x89, 0x97, 0x9F})


def properties(packet_type: int) -> Properties:
    """Return empty MQTT 5 properties for one packet type."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho leaves it unannotated


def connect_options(opts: MqttOptions) -> dict[str, Any]:
    """Return the MQTT 5 ``connect_async`` keywords: session and flow control."""
    props = properties(PacketTypes.CONNECT)
    # The default Receive Maximum lets Mosquitto have only 20 unacked messages in
    # flight; the aggregator holds a whole round's updates until it commits.
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    props.SessionExpiryInterval = opts.session_expiry if opts.persistent else 0
    return {"clean_start": not opts.persistent, "properties": props}


def redelivered_marker() -> Properties:
    """Return PUBLISH properties that mark a requeued message."""
    props = properties(PacketTypes.PUBLISH)
    props.UserProperty = (REDELIVERED_PROPERTY, "1")
    return props


def subscribe_properties(sub_id: int) -> Properties:
    """Return SUBSCRIBE properties carrying a subscription identifier."""
    props = properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = sub_id
    return props


def publish_size(topic: str, body: bytes, props: Properties | None) -> int:
    """Return the size in bytes of the QoS 1 PUBLISH packet paho will send."""
    props_size = len(props.pack()) if props is not None else 1  # type: ignore[no-untyped-call]
    remaining = 2 + len(topic.encode()) + 2 + props_size + len(body)
    return 1 + _varint_size(remaining) + remaining


def read_inbound(message: paho.MQTTMessage, epoch: int) -> Inbound:
    """Return the transport's view of a received PUBLISH."""
    payload = message.payload
    body = payload if isinstance(payload, bytes) else bytes(payload)  # no copy of a model
    props: Any = message.properties  # None under MQTT 3
    sub_ids = getattr(props, "SubscriptionIdentifier", None) or []
    user_props = getattr(props, "UserProperty", None) or []
    marked = any(key == REDELIVERED_PROPERTY for key, _ in user_props)
    return Inbound(
        mid=message.mid,
        qos=message.qos,
        topic=message.topic,
        body=body,
        redelivered=bool(message.dup) or marked,
        epoch=epoch,
        sub_ids=tuple(sub_ids),
    )


def no_delay(sock: Any) -> None:
    """Turn off Nagle's algorithm on a TCP socket."""
    # Small packets (acks, control messages) otherwise wait behind the peer's
    # delayed ACK: measured 40 ms per publish when a PUBACK follows a delivery.
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def first_connect_error(
    opts: MqttOptions, *, refused: ReasonCode | None, tls: OSError | None, answered: bool
) -> TransportError:
    """Return the error for a first connect that failed: refused, TLS, or no answer in time.

    ``answered`` says an MQTT 5 connect got as far as an open socket.
    """
    url, timeout = opts.safe_url, opts.connect_timeout
    if refused is not None:
        hint = "; add ?protocol=3.1.1 for an MQTT 3 broker" if refused.value == 0x84 else ""
        return TransportError(f"{url} refused the connection: {refused}{hint}")
    if tls is not None:
        error = TlsError if is_permanent_tls_failure(tls) else ConnectionLost
        return error(f"{url}: {describe_tls_failure(tls)}")
    if answered:
        return ConnectionLost(
            f"{url} accepted TCP but sent no CONNACK within {timeout:g} s"
            " (a TLS listener needs mqtts://; an MQTT 3 broker such as amqtt, ?protocol=3.1.1)"
        )
    return ConnectionLost(f"no MQTT broker answered at {url} within {timeout:g} s")


def watch_tls(context: ssl.SSLContext, record: Callable[[OSError], None]) -> None:
    """Make ``context``'s sockets hand what fails their handshake or a read to ``record``."""

    # paho treats a failed handshake like any failed connect: it retries, and
    # keeps the reason to itself. This is how the transport learns it, to fail
    # at once on a certificate that does not verify and to say why. Reads count
    # too: under TLS 1.3 a broker refuses a client's certificate (or its lack of
    # one) only after the handshake, with an alert on the first read.
    class WatchedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            try:
                super().do_handshake(block)
            except OSError as exc:
                record(exc)
                raise

        def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
            try:
                return super().recv(buflen, flags)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise  # a non-blocking socket with nothing to read yet
            except ssl.SSLError as exc:
                record(exc)
                raise

        def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
            try:
                return super().recv_into(buffer, nbytes, flags)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                record(exc)
                raise

    context.sslsocket_class = WatchedSocket


def _varint_size(value: int) -> int:
    """Return how many bytes MQTT's variable-length integer takes for ``value``."""
    return 1 if value < 128 else 2 if value < 16_384 else 3 if value < 2_097_152 else 4
