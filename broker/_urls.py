"""URL helpers every broker-facing piece shares: redaction, and scheme alias tables."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def redact(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


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
