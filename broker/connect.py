"""Pick a transport from a broker URL; the only place that maps schemes to classes.

It also reads what every network transport takes from its URL the same way:
the TLS settings of ``mqtts://`` and ``amqps://`` (``ca``, ``cert``, ``key``).
"""

from __future__ import annotations

import ssl
from collections.abc import MutableMapping
from typing import Protocol, cast
from urllib.parse import urlsplit

from broker._urls import binds_client_ids as binds_client_ids
from broker._urls import is_in_process as is_in_process
from broker._urls import load_alias
from broker._urls import with_query as with_query  # re-exported: URL settings callers add
from broker._urls import with_session_expiry as with_session_expiry
from broker.errors import TransportError, UnknownTransport
from broker.transport import ReconnectListener, Transport, Will

# Lazy so that pika and paho are imported only by the processes that use them.
TRANSPORT_ALIASES: dict[str, str] = {
    "memory": "broker.memory:MemoryTransport",
    "amqp": "broker.amqp:AmqpTransport",
    "amqps": "broker.amqp:AmqpTransport",
    "mqtt": "broker.mqtt:MqttTransport",
    "mqtts": "broker.mqtt:MqttTransport",
}

TLS_QUERY_KEYS = frozenset({"ca", "cert", "key"})
"""Query keys of a TLS URL: the CA file to verify the broker with, our certificate and key."""

# Failures of the transport under TLS (a connection cut mid-handshake) rather
# than of TLS itself: worth trying again, unlike a certificate that does not verify.
_TRANSIENT_TLS = (
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    ssl.SSLSyscallError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


class _TransportClass(Protocol):
    """What an alias names: a class with FedMQ's ``from_url`` constructor."""

    def from_url(
        self, url: str, *, client_id: str | None = None, will: Will | None = None
    ) -> Transport:
        """Connect to ``url``."""
        ...


def connect(
    url: str,
    *,
    client_id: str | None = None,
    will: Will | None = None,
    on_reconnect: ReconnectListener | None = None,
) -> Transport:
    """Return a connected transport for ``url``, whatever its scheme.

    Parameters
    ----------
    url
        The broker URL; its scheme chooses the transport: ``memory://``,
        ``amqp[s]://user:pw@host:port/vhost`` or ``mqtt[s]://user:pw@host:port``.
        Credentials come from the userinfo; TLS URLs take ``ca``, ``cert`` and
        ``key`` file paths in the query.
    client_id
        Who connects: the MQTT client id (and a persistent session), the AMQP
        connection name; the in-process bus ignores it. Overrides the URL's
        ``client_id``.
    will
        ``(topic, frame)`` the broker publishes if this client vanishes without
        closing. MQTT sends it as its last will; AMQP and the in-process bus have
        no such thing and ignore it.
    on_reconnect
        Called on a thread of its own after every reconnect (see
        ``Transport.on_reconnect``).

    Returns
    -------
    Transport
        A transport ready to publish and subscribe.

    Raises
    ------
    UnknownTransport
        The scheme is not one FedMQ speaks, or its client library is missing.
    TlsError
        The broker's certificate did not verify, or it refused ours.
    ConnectionLost
        The broker could not be reached.
    """

    def unknown(scheme: str, known: str) -> UnknownTransport:
        return UnknownTransport(f"no transport for the URL scheme {scheme!r}; FedMQ speaks {known}")

    try:
        factory = cast(_TransportClass, load_alias(TRANSPORT_ALIASES, url, unknown))
    except ModuleNotFoundError as exc:
        scheme = urlsplit(url).scheme
        raise UnknownTransport(f"the {scheme}:// transport is not available: {exc}") from exc
    transport = factory.from_url(url, client_id=client_id, will=will)
    if on_reconnect is not None:
        transport.on_reconnect(on_reconnect)
    return transport


def tls_from_query(
    scheme: str, query: MutableMapping[str, str], safe_url: str
) -> ssl.SSLContext | None:
    """Take the TLS keys out of ``query``; return the client context a ``...s://`` scheme needs.

    The context verifies the broker's certificate against ``ca`` (the system's
    store without it) and checks its host name; there is deliberately no way to
    turn either off.
    """
    ca, cert, key = (query.pop(name, None) for name in ("ca", "cert", "key"))
    safe_url = safe_url.partition("?")[0]  # the file named in the message is enough
    if not scheme.endswith("s"):
        if ca is not None or cert is not None or key is not None:
            raise TransportError(f"{safe_url}: ca, cert and key need a TLS URL ({scheme}s://)")
        return None
    if key is not None and cert is None:
        raise TransportError(f"{safe_url}: key= needs cert=")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if ca is not None:
            what = f"ca={ca}"
            context.load_verify_locations(cafile=ca)
        if cert is not None:
            what = f"cert={cert}" + (f", key={key}" if key else "")
            context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:  # a file that is not the PEM it should be
        raise TransportError(f"{safe_url}: cannot load {what}: {_reason(exc)}") from exc
    except OSError as exc:
        raise TransportError(f"{safe_url}: cannot load {what}: {exc.strerror or exc}") from exc
    return context


def describe_tls_failure(exc: OSError) -> str:
    """Return one line saying why a TLS handshake, or a read just after it, failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the broker's certificate does not verify ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError) and "ALERT" in (exc.reason or ""):
        return (
            f"the broker refused the TLS session ({_reason(exc)}; is our certificate one it takes?)"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({_reason(exc)})"
    return f"the TLS handshake did not complete ({exc}; is this port a TLS listener?)"


def _reason(exc: ssl.SSLError) -> str:
    # str() is "[SSL: REASON] text (_ssl.c:NNN)"; the reason alone reads better.
    return (exc.reason or type(exc).__name__).lower().replace("_", " ")


def is_permanent_tls_failure(exc: BaseException) -> bool:
    """Return whether ``exc`` is a TLS failure that trying again will not change."""
    return isinstance(exc, ssl.SSLError) and not isinstance(exc, _TRANSIENT_TLS)
