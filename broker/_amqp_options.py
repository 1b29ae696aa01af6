"""Pure helpers of the AMQP transport: URL options and the topic <-> routing-key mapping."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika

from broker._urls import redact
from broker.connect import tls_from_query
from broker.errors import ConnectionLost, TransportError
from broker.retry import MAX_ATTEMPTS

# Defaults applied only when the URL does not set them itself.
_PIKA_DEFAULTS = {
    # Short enough that a dead peer behind a NAT is noticed within a minute.
    "heartbeat": 30,
    # A broker under a memory alarm blocks publishers; give up on it like on a lost link.
    "blocked_connection_timeout": 60,
    # pika's 10 s would make an unreachable host take 30 s over three attempts.
    "socket_timeout": 5,
}


@dataclass(frozen=True)
class AmqpOptions:
    """What ``AmqpTransport`` takes from its URL."""

    params: pika.URLParameters
    safe_url: str
    """The URL without its password, for messages and logs."""
    prefetch: int = 1000
    """Unacked messages the broker may push per consumer (0: unlimited).

    High by default because the aggregator acks accepted updates only when the round
    commits: a consumer holding a round's updates must not starve waiting for its own acks.
    """
    publish_timeout: float = 60.0
    """Seconds ``publish`` waits for a confirm, across reconnects, before ``ConnectionLost``."""
    max_attempts: int = MAX_ATTEMPTS
    """Reconnect attempts after a lost connection before giving up (0: forever)."""
    connect_attempts: int = 3
    """Attempts at construction, kept short so a bad URL fails fast."""


def parse_url(url: str, *, client_id: str | None = None) -> AmqpOptions:
    """Split FedMQ's options off an ``amqp[s]://`` URL and build pika's parameters.

    ``client_id`` (or the URL's ``client_id``) names the connection in
    RabbitMQ's management UI; ``ca``, ``cert`` and ``key`` set up ``amqps://``.
    """
    safe = redact(url)
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    if "ssl_options" in query:
        # pika evaluates it as a Python literal; one way to say TLS is enough.
        raise TransportError(f"{safe}: use ca=, cert= and key= instead of ssl_options")
    tls = tls_from_query(parts.scheme, query, safe)
    in_url = query.pop("client_id", None)
    connection_name = client_id or in_url
    ours: dict[str, float] = {}
    try:
        for name, kind in (("prefetch", int), ("publish_timeout", float), ("max_attempts", int)):
            if name in query:
                ours[name] = kind(query.pop(name))
                if ours[name] < 0:
                    raise ValueError(f"{name} must not be negative")
        for name, value in _PIKA_DEFAULTS.items():
            query.setdefault(name, str(value))
        params = pika.URLParameters(urlunsplit(parts._replace(query=urlencode(query))))
    except ValueError as exc:
        raise ConnectionLost(f"bad AMQP URL {safe}: {exc}") from exc
    if tls is not None:
        # pika would otherwise use its own default context for amqps://.
        params.ssl_options = pika.SSLOptions(tls, server_hostname=params.host)
    if connection_name:
        params.client_properties = {
            **(params.client_properties or {}),
            "connection_name": connection_name,
        }
    return AmqpOptions(
        params=params,
        safe_url=safe,
        prefetch=int(ours.get("prefetch", 1000)),
        publish_timeout=ours.get("publish_timeout", 60.0),
        max_attempts=int(ours.get("max_attempts", MAX_ATTEMPTS)),
    )


def routing_key(topic: str, *, pattern: bool = False) -> str:
    """Map a ``/`` topic (or MQTT pattern) to an AMQP routing key (or binding key).

    Separators swap (``/`` <-> ``.``) exactly as RabbitMQ's MQTT plugin does, so a
    topic keeps its name across both protocols; ``+`` becomes ``*``, ``#`` stays.
    """
    segments = []
    for segment in topic.split("/"):
        if segment in ("+", "#"):
            if not pattern:
                raise TransportError(f"cannot publish to a wildcard topic: {topic!r}")
            segments.append("*" if segment == "+" else "#")
        else:
            segments.append(segment.replace(".", "/"))
    key = ".".join(segments)
    if len(key.encode()) > 255:
        raise TransportError(f"topic longer than AMQP's 255-byte routing key: {topic[:40]}...")
    return key


def topic_of(key: str) -> str:
    """Map an AMQP routing key back to its ``/`` topic."""
    return "/".join(segment.replace("/", ".") for segment in key.split("."))
