"""The settings an ``mqtt://`` or ``mqtts://`` URL carries, parsed and checked once."""

from __future__ import annotations

import ssl
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from broker._urls import redact
from broker.connect import TLS_QUERY_KEYS, tls_from_query
from broker.errors import TransportError

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883


@dataclass(frozen=True)
class MqttOptions:
    """Where the broker is and how to hold the session, from ``mqtt://user:pw@host:port?k=v``."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    client_id: str = ""
    persistent: bool = False
    """Whether the session outlives the connection: true when the URL names a ``client_id``."""
    username: str | None = None
    password: str | None = None
    session_expiry: int = 3600
    """Seconds the broker keeps a persistent session (its subscriptions and queue) offline."""
    keepalive: int = 30
    protocol: str = "5"
    """``5``, or ``3.1.1`` for brokers such as amqtt that do not speak MQTT 5."""
    connect_timeout: float = 5.0
    """Seconds to keep trying the first connection before giving up."""
    publish_timeout: float = 60.0
    """Seconds ``publish`` waits for the broker, reconnects included, before giving up."""
    tls: ssl.SSLContext | None = None
    """The client context of an ``mqtts://`` URL, verifying the broker; None for ``mqtt://``."""

    @classmethod
    def parse(cls, url: str, *, client_id: str | None = None) -> MqttOptions:
        """Read the options from ``url``; unknown query keys are an error, not ignored.

        ``client_id``, when given, replaces the URL's own.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise TransportError(f"not an mqtt:// or mqtts:// URL: {redact(url)}")
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        unknown = set(query) - _QUERY_KEYS
        if unknown:
            known = ", ".join(sorted(_QUERY_KEYS))
            raise TransportError(f"unknown mqtt:// option(s) {sorted(unknown)}; known: {known}")
        tls = tls_from_query(parts.scheme, query, redact(url))
        client_id = client_id or query.get("client_id", "")
        protocol = query.get("protocol", "5")
        if protocol not in ("5", "3.1.1"):
            raise TransportError(f"protocol must be 5 or 3.1.1, not {protocol!r}")
        try:
            return cls(
                host=parts.hostname or "127.0.0.1",
                port=parts.port or (DEFAULT_TLS_PORT if tls is not None else DEFAULT_PORT),
                # A random id means nobody can resume the session, so keep none.
                client_id=client_id or f"fedmq-{uuid.uuid4().hex[:12]}",
                persistent=bool(client_id),
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
                session_expiry=int(query.get("session_expiry", 3600)),
                keepalive=int(query.get("keepalive", 30)),
                protocol=protocol,
                connect_timeout=float(query.get("connect_timeout", 5.0)),
                publish_timeout=float(query.get("publish_timeout", 60.0)),
                tls=tls,
            )
        except ValueError as exc:
            raise TransportError(f"bad mqtt:// URL {redact(url)}: {exc}") from exc

    @property
    def safe_url(self) -> str:
        """Return the broker's address for messages and logs, without the password."""
        user = f"{self.username}@" if self.username else ""
        scheme = "mqtts" if self.tls is not None else "mqtt"
        return f"{scheme}://{user}{self.host}:{self.port}"


_QUERY_KEYS = TLS_QUERY_KEYS | {
    "client_id",
    "session_expiry",
    "keepalive",
    "protocol",
    "connect_timeout",
    "publish_timeout",
}
