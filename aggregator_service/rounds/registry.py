"""Device identities: registration, rotation, revocation, and the keys check-ins are verified with.

A device makes its own Ed25519 key pair and registers the public half (as
Flower's SuperNodes do): the private key never leaves the device, so neither
the service's database nor its operator can sign as the device. For tools and
emulators that cannot keep a key, the service can make the pair and hand the
private half back once. Broker credentials, where a ``BrokerAccess`` is
configured, are provisioned at registration and removed at revocation.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from aggregator_service.errors import ConfigError, Conflict, NotFound
from aggregator_service.persistence import Database, DeviceRecord
from broker import topics
from broker.errors import IdentityError
from broker.identity import Identity, decode_public_key, encode_key

log = logging.getLogger(__name__)

PLATFORMS = ("android", "ios", "python", "emulated")


class BrokerCredentials(Protocol):
    """A device's own broker user."""

    @property
    def username(self) -> str:
        """Return the broker user name."""
        ...

    @property
    def password(self) -> str:
        """Return the broker password."""
        ...


class BrokerAccess(Protocol):
    """Provisions per-device broker users (Mosquitto dynamic security, RabbitMQ users)."""

    def grant(self, device_id: str) -> BrokerCredentials:
        """Create (or reset) ``device_id``'s broker user; return its credentials."""
        ...

    def revoke(self, device_id: str) -> None:
        """Remove ``device_id``'s broker user and drop its connections."""
        ...


@dataclass(frozen=True)
class Registration:
    """What a device is told once, when it registers or rotates its key."""

    device_id: str
    token: str
    public_key: str
    private_key: str | None
    """The private key, only when the service made the pair (base64 of 32 raw bytes)."""
    broker: BrokerCredentials | None


class DeviceRegistry:
    """The registered devices and their pinned keys (cached; the database is the truth).

    Parameters
    ----------
    db
        Where devices are recorded.
    access
        Provisions broker users (None: the broker's own configuration decides).
    max_devices
        Registrations beyond this are refused, so no flood can grow the table unbounded.
    """

    def __init__(
        self,
        db: Database,
        *,
        access: BrokerAccess | None = None,
        max_devices: int = 1_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = db
        self._access = access
        self._max = max_devices
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, bytes | None] = {}

    def register(
        self, platform: str, *, public_key: str | None = None, device_id: str | None = None
    ) -> Registration:
        """Register a new device (``device_id`` proposed by the caller, else made up).

        Re-registering an existing id with the same public key returns it
        again (an emulated fleet restarting); with another key it is a
        conflict: rotate the key instead.
        """
        if platform not in PLATFORMS:
            raise ConfigError(f"platform must be one of {', '.join(PLATFORMS)}")
        key, private = _key_pair(public_key)
        if device_id is None:
            device_id = f"{_slug(platform)}-{uuid.uuid4().hex[:12]}"
        elif not topics.is_valid_segment(device_id):
            raise ConfigError("device_id: 1-128 letters, digits, '_' or '-'")
        existing = self._db.device(device_id)
        if existing is not None:
            if existing.public_key != encode_key(key) or existing.revoked_at is not None:
                raise Conflict(f"device {device_id} is registered with another key; rotate it")
            return self._issue(device_id, key, private)
        if self._db.count_devices() >= self._max:
            raise Conflict(f"this service holds its maximum of {self._max} devices")
        token = secrets.token_urlsafe(32)
        self._db.add_device(
            device_id, platform, _digest(token), self._clock(), public_key=encode_key(key)
        )
        with self._lock:
            self._keys[device_id] = key  # its first check-in reads no database
        log.info("registered device %s (%s)", device_id, platform)
        return self._issued(device_id, token, key, private)

    def rotate(self, device_id: str, public_key: str | None = None) -> Registration:
        """Replace a device's key (and token, and broker password); the old ones stop working."""
        record = self._record(device_id)
        if record.revoked_at is not None:
            raise Conflict(f"device {device_id} is revoked; register a new one")
        key, private = _key_pair(public_key)
        registration = self._issue(device_id, key, private)
        log.info("rotated the key of device %s", device_id)
        return registration

    def revoke(self, device_id: str) -> None:
        """Revoke a device: its frames are refused from now on, its broker user removed."""
        self._record(device_id)
        self._db.update_device(device_id, revoked_at=self._clock())
        with self._lock:
            self._keys[device_id] = None
        if self._access is not None:
            self._access.revoke(device_id)
        log.info("revoked device %s", device_id)

    def preload(self) -> None:
        """Cache every registered device's key at once (a restarted fleet's check-ins read none)."""
        keys: dict[str, bytes | None] = {}
        for device_id, text in self._db.device_keys().items():
            try:
                keys[device_id] = None if text is None else decode_public_key(text)
            except IdentityError:
                log.warning("device %s has an unreadable key: it may not check in", device_id)
                keys[device_id] = None
        with self._lock:
            for device_id, key in keys.items():  # a key cached meanwhile is as new or newer
                self._keys.setdefault(device_id, key)

    def key(self, device_id: str) -> bytes | None:
        """Return the pinned key of a registered, unrevoked device (None otherwise)."""
        with self._lock:
            if device_id in self._keys:
                return self._keys[device_id]
        record = self._db.device(device_id) if topics.is_valid_segment(device_id) else None
        key = None
        if record is not None and record.revoked_at is None and record.public_key:
            key = decode_public_key(record.public_key)
        with self._lock:
            if record is not None or len(self._keys) < 100_000:
                self._keys[device_id] = key  # strangers cached too, but boundedly
        return key

    def count(self) -> int:
        """Return how many devices are registered."""
        return self._db.count_devices()

    def devices(self) -> list[DeviceRecord]:
        """Return every registered device."""
        return self._db.devices()

    def _record(self, device_id: str) -> DeviceRecord:
        record = self._db.device(device_id) if topics.is_valid_segment(device_id) else None
        if record is None:
            raise NotFound(f"no device {device_id}")
        return record

    def _issue(self, device_id: str, key: bytes, private: str | None) -> Registration:
        """Give an existing device a fresh token (and key), and its broker user anew."""
        token = secrets.token_urlsafe(32)
        self._db.update_device(device_id, public_key=encode_key(key), token_sha256=_digest(token))
        with self._lock:
            self._keys[device_id] = key
        return self._issued(device_id, token, key, private)

    def _issued(self, device_id: str, token: str, key: bytes, private: str | None) -> Registration:
        broker = self._access.grant(device_id) if self._access is not None else None
        return Registration(device_id, token, encode_key(key), private, broker)


def _key_pair(public_key: str | None) -> tuple[bytes, str | None]:
    """Return the raw public key given, or of a pair made here (with its private half)."""
    if public_key is not None:
        try:
            return decode_public_key(public_key), None
        except IdentityError as exc:
            raise ConfigError(f"public_key: {exc}") from exc
    made = Identity.generate("device")
    return made.public_key, encode_key(made.private_bytes())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "x"
