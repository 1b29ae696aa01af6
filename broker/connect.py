"""Pick a transport from a broker URL; the only place that maps schemes to classes."""

from __future__ import annotations

import importlib
from typing import Any, cast
from urllib.parse import urlsplit

from broker.errors import UnknownTransport
from broker.transport import Transport

# Lazy so that pika and paho are imported only by the processes that use them.
TRANSPORT_ALIASES: dict[str, str] = {
    "memory": "broker.memory:MemoryTransport",
    "amqp": "broker.amqp:AmqpTransport",
    "mqtt": "broker.mqtt:MqttTransport",
}


def connect(url: str, **options: Any) -> Transport:
    """Return a connected transport for ``url`` (``memory://``, ``amqp://...``, ``mqtt://...``).

    Parameters
    ----------
    url
        The broker URL; its scheme chooses the transport.
    **options
        Transport-specific keywords (MQTT: ``client_id``, ``will``).

    Returns
    -------
    Transport
        A transport ready to publish and subscribe.
    """
    scheme = urlsplit(url).scheme
    target = TRANSPORT_ALIASES.get(scheme)
    if target is None:
        known = ", ".join(f"{s}://" for s in TRANSPORT_ALIASES)
        raise UnknownTransport(f"no transport for {url!r}; FedMQ speaks {known}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UnknownTransport(f"the {scheme}:// transport is not available: {exc}") from exc
    return cast(Transport, getattr(module, class_name).from_url(url, **options))
