"""URL helpers every broker-facing piece shares: redaction, and scheme alias tables."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MQTT_SCHEMES = frozenset({"mqtt", "mqtts"})


def redact(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def with_query(url: str, **params: str) -> str:
    """Return ``url`` with query parameters added (existing ones are kept unless overridden)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def is_in_process(url: str) -> bool:
    """Return whether ``url`` names the in-process bus (one shared by everything in a process)."""
    return urlsplit(url).scheme == "memory"


def binds_client_ids(url: str) -> bool:
    """Return whether the broker at ``url`` binds a connection to its client id.

    MQTT does: a second connection with a client id takes the first one over.
    """
    return urlsplit(url).scheme in MQTT_SCHEMES


def with_session_expiry(url: str, seconds: int | None) -> str:
    """Return ``url`` asking the broker to keep a vanished client's session ``seconds``.

    Only MQTT has sessions that outlive a connection: any other URL, or
    ``seconds`` None, comes back unchanged.
    """
    if seconds is None or urlsplit(url).scheme not in MQTT_SCHEMES:
        return url
    return with_query(url, session_expiry=str(seconds))


def load_alias(
    aliases: Mapping[str, str], url: str, unknown: Callable[[str, str], Exception]
) -> Any:
    """Return the class ``aliases`` names for ``url``'s scheme (``module:Class``, imported now).

    ``unknown(scheme, known)`` builds the error for a scheme the table lacks;
    only the scheme goes into it, never the rest of the URL (it may hold a
    password). Imports are lazy so each client library loads only where used.
    """
    scheme = urlsplit(url).scheme
    target = aliases.get(scheme)
    if target is None:
        raise unknown(scheme, ", ".join(f"{s}://" for s in aliases))
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
