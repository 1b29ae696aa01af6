"""Pure helpers of the AMQP transport: URL options, queue arguments, topic <-> routing key."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

import pika

from broker._urls import redact
from broker.connect import tls_from_query
from broker.errors import ConnectionLost, TransportError
from broker.retry import MAX_ATTEMPTS

EXCHANGE = "fedmq"
DEAD_LETTER_EXCHANGE = "fedmq.dlx"
DEAD_LETTERS = "fedmq.dead-letters"
GROUP_PREFIX = "fedmq.group."
PLAIN_PREFIX = "fedmq.sub."
PLAIN_QUEUE_EXPIRY_S = 600
"""Seconds RabbitMQ keeps a plain subscription's queue without a consumer.

Longer than the reconnects of a transport before it gives up (``max_attempts``),
so a subscriber that reconnects finds what was published meanwhile; short enough
that the queue of a process killed without closing does not linger for long.
"""

# Defaults applied only when the URL does not set them itself.
_PIKA_DEFAULTS = {
    # Short enough that a dead peer behind a NAT is noticed within a minute.
    "heartbeat": 30,
    # A broker under a memory alarm blocks publishers; give up on it like on a lost link.
    "blocked_connection_timeout": 60,
    # pika's 10 s would make an unreachable host take 30 s over three attempts.
    "socket_timeout": 5,
}


class QueueType(Enum):
    """The kind of queue every subscription declares (the URL's ``queue_type``)."""

    CLASSIC = "classic"
    """RabbitMQ's default: one node holds the queue, unreachable while that node is down."""
    QUORUM = "quorum"
    """Replicated on the cluster's nodes (Raft): it keeps working while most of them run."""


@dataclass(frozen=True)
class AmqpOptions:
    """What ``AmqpTransport`` takes from its URL."""

    addresses: tuple[pika.ConnectionParameters, ...]
    """One entry per broker node in the URL, tried in turn; all share login, vhost and TLS."""
    safe_url: str
    """The URL without its password, for messages and logs."""
    prefetch: int = 1000
    """Unacked messages the broker may push per consumer (0: unlimited).

    High by default because the aggregator acks accepted updates only when the round
    commits: a consumer holding a round's updates must not starve waiting for its own acks.
    """
    publish_timeout: float = 60.0
    """Seconds ``publish`` waits for a confirm (across reconnects and nacks) before giving up."""
    max_attempts: int = MAX_ATTEMPTS
    """Reconnect attempts after a lost connection before giving up (0: forever)."""
    connect_attempts: int = 3
    """Attempts at construction, kept short so a bad URL fails fast."""
    queue_type: QueueType = QueueType.CLASSIC
    """The kind of queue declared for every subscription and for the dead letters."""

    @property
    def params(self) -> pika.ConnectionParameters:
        """Return the first address's parameters (the others differ only in host and port)."""
        return self.addresses[0]


def parse_url(url: str, *, client_id: str | None = None) -> AmqpOptions:
    """Split FedMQ's options off an ``amqp[s]://`` URL and build pika's parameters.

    The URL may name several nodes of one cluster, comma-separated as in
    libpq's URLs (``amqp://user:pw@host1:5672,host2:5672/vhost``): each gets
    the same login, vhost, options and TLS, and its own host name to verify.
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
        queue_type = _queue_type(query.pop("queue_type", QueueType.CLASSIC.value))
        for name, kind in (("prefetch", int), ("publish_timeout", float), ("max_attempts", int)):
            if name in query:
                ours[name] = kind(query.pop(name))
                if ours[name] < 0:
                    raise ValueError(f"{name} must not be negative")
        for name, value in _PIKA_DEFAULTS.items():
            query.setdefault(name, str(value))
        addresses = tuple(
            pika.URLParameters(urlunsplit(one._replace(query=urlencode(query))))
            for one in _one_url_per_host(parts)
        )
    except ValueError as exc:
        raise ConnectionLost(f"bad AMQP URL {safe}: {exc}") from exc
    for params in addresses:
        if tls is not None:
            # pika would otherwise use its own default context for amqps://.
            params.ssl_options = pika.SSLOptions(tls, server_hostname=params.host)
        if connection_name:
            params.client_properties = {
                **(params.client_properties or {}),
                "connection_name": connection_name,
            }
    return AmqpOptions(
        addresses=addresses,
        safe_url=safe,
        prefetch=int(ours.get("prefetch", 1000)),
        publish_timeout=ours.get("publish_timeout", 60.0),
        max_attempts=int(ours.get("max_attempts", MAX_ATTEMPTS)),
        queue_type=queue_type,
    )


def _queue_type(value: str) -> QueueType:
    try:
        return QueueType(value)
    except ValueError:
        known = " or ".join(kind.value for kind in QueueType)
        raise ValueError(f"queue_type must be {known}, not {value!r}") from None


def _one_url_per_host(parts: SplitResult) -> list[SplitResult]:
    """Return ``parts`` once per host of its comma-separated netloc, with the same userinfo."""
    userinfo, at, hosts = parts.netloc.rpartition("@")
    names = hosts.split(",")
    if "" in names and len(names) > 1:
        raise ValueError("an empty host between commas")
    return [parts._replace(netloc=f"{userinfo}{at}{host}") for host in names]


def queue_arguments(queue_type: QueueType, *, plain: bool) -> dict[str, object]:
    """Return the arguments a subscription's queue is declared with.

    Every queue dead-letters to ``fedmq.dlx``. A plain subscription's queue is
    not tied to the connection, so what is published to the subscriber while it
    reconnects waits in it; ``x-expires`` drops it once it has had no consumer
    for ``PLAIN_QUEUE_EXPIRY_S`` (a process killed without closing).

    A quorum group queue keeps the group's updates through the loss of any
    minority of nodes. A plain queue is a quorum queue too when asked, although
    each costs a Raft group (measured on a 3-node cluster here: ~17 ms to
    declare against ~4 ms, ~340 KB of memory across the nodes): a classic
    durable queue whose node is down cannot be declared again anywhere else
    (RabbitMQ 3.10 answers 404 "home node ... is down or inaccessible"), so its
    subscriber could not resubscribe on a surviving node; a non-durable one
    could, but it dies with its node and what it held with it, tasks and round
    control included. Quorum queues take both arguments on 3.10 (``x-expires``
    and ``x-dead-letter-exchange``) and refuse to be non-durable or auto-delete,
    which FedMQ never asks.
    """
    arguments: dict[str, object] = {"x-dead-letter-exchange": DEAD_LETTER_EXCHANGE}
    if plain:
        arguments["x-expires"] = PLAIN_QUEUE_EXPIRY_S * 1000
    return {**arguments, **type_argument(queue_type)}


def type_argument(queue_type: QueueType) -> dict[str, object]:
    """Return the ``x-queue-type`` argument of a queue of ``queue_type``.

    A classic queue goes without it, so a deployment that never set
    ``queue_type`` declares exactly what it declared before the option existed.
    """
    if queue_type is QueueType.CLASSIC:
        return {}
    return {"x-queue-type": queue_type.value}


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
