"""What both brokers' access control share: credentials, user names, the admin URL."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from broker._urls import redact
from broker.errors import AccessError
from broker.topics import DEFAULT_NAMESPACE, is_valid_segment

SECRET_BYTES = 32
"""Random bytes in a generated password (256 bits, URL-safe base64)."""


@dataclass(frozen=True)
class DeviceCredentials:
    """A broker login made by ``grant``; the password never shows in its ``repr``."""

    username: str
    password: str = field(repr=False)

    def url_for(self, broker_url: str) -> str:
        """Return ``broker_url`` with this login as its userinfo (replacing any there).

        Parameters
        ----------
        broker_url
            A transport URL such as ``mqtt://host:1883?protocol=3.1.1``.

        Returns
        -------
        str
            The same URL carrying ``username:password@``, both percent-encoded.
        """
        parts = urlsplit(broker_url)
        host = parts.netloc.rpartition("@")[2]
        userinfo = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}"
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


@dataclass(frozen=True)
class AdminUrl:
    """An access URL taken apart: where the admin API is, who logs in, and the options."""

    scheme: str
    host: str
    port: int | None
    username: str
    password: str = field(repr=False)
    namespace: str
    options: dict[str, str]
    safe_url: str
    """The URL without its password, for messages."""

    @classmethod
    def parse(cls, url: str, known: frozenset[str]) -> AdminUrl:
        """Split ``url``; raise ``AccessError`` for missing credentials or unknown options."""
        parts = urlsplit(url)
        safe = redact(url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        unknown = set(query) - known - {"namespace"}
        if unknown:
            raise AccessError(f"{safe}: unknown option(s) {sorted(unknown)}")
        if not parts.username or parts.password is None:
            raise AccessError(f"{safe}: the URL must carry the admin's user and password")
        namespace = query.pop("namespace", DEFAULT_NAMESPACE)
        if not is_valid_segment(namespace):
            raise AccessError(f"{safe}: namespace {namespace!r} is not a valid topic segment")
        try:
            port = parts.port
        except ValueError as exc:
            raise AccessError(f"{safe}: {exc}") from None
        return cls(
            scheme=parts.scheme,
            host=parts.hostname or "127.0.0.1",
            port=port,
            username=unquote(parts.username),
            password=unquote(parts.password),
            namespace=namespace,
            options=query,
            safe_url=safe,
        )


def new_secret() -> str:
    """Return a fresh random password."""
    return secrets.token_urlsafe(SECRET_BYTES)


def checked_id(kind: str, value: str) -> str:
    """Return ``value`` if it can name a device or server user, else raise ``AccessError``."""
    if not is_valid_segment(value):
        raise AccessError(f"{kind} id {value!r} is not valid (letters, digits, '_', '-')")
    return value


def device_username(namespace: str, device_id: str) -> str:
    """Return the broker user of a device: ``<namespace>.<device id>``.

    The dot cannot occur in either part, so two namespaces never share a user.
    """
    return f"{namespace}.{checked_id('device', device_id)}"


def server_username(namespace: str, name: str) -> str:
    """Return the broker user of a server-side component: ``<namespace>.server.<name>``."""
    return f"{namespace}.server.{checked_id('server', name)}"
