"""Identities on the bus: a party's name and Ed25519 key, and the public keys others pin.

Ed25519 because every platform FedMQ targets has it (Android's Tink and
BouncyCastle, Apple's CryptoKit, Python's ``cryptography``), signatures are
64 bytes and verification is fast enough to check every frame. A public key
travels as the standard base64 of its 32 raw bytes.
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from broker.errors import IdentityError

SERVICE_NAME = "coordinator"
"""The sender name the service signs as; devices and workers pin its key under this name."""
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64

KeyLookup = Callable[[str], bytes | None]
"""Returns the raw public key a sender name is pinned to, or None for a stranger."""


class Identity:
    """A party's name and private key: it signs the frames the party sends.

    Parameters
    ----------
    name
        The sender name receivers know this key by (a device id, a worker's
        name, the service's name).
    private_key
        The Ed25519 key; generate one with ``Identity.generate``.
    """

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self.name = name
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls, name: str) -> Identity:
        """Return a new identity with a fresh key."""
        return cls(name, Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, name: str, raw: bytes) -> Identity:
        """Return the identity of a raw 32-byte private key."""
        try:
            return cls(name, Ed25519PrivateKey.from_private_bytes(raw))
        except ValueError as exc:
            raise IdentityError(f"not an Ed25519 private key: {exc}") from exc

    @classmethod
    def load_or_create(cls, name: str, path: Path) -> Identity:
        """Return the identity kept in ``path``, creating it (mode 0600) on first use."""
        if path.exists():
            raw = _read_key_file(path)
            try:
                return cls.from_private_bytes(name, raw)
            except IdentityError as exc:
                raise IdentityError(f"key file {path}: {exc}") from exc
        identity = cls.generate(name)
        try:
            if path.parent.exists() and not path.parent.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "its folder is not a directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            # Created with the restrictive mode, never world-readable for an instant.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(encode_key(identity.private_bytes()) + "\n")
        except OSError as exc:
            raise IdentityError(f"cannot create the key file {path}: {exc.strerror}") from exc
        return identity

    @property
    def public_key_text(self) -> str:
        """Return the public key as base64 text, as registrations and docs carry it."""
        return encode_key(self.public_key)

    def private_bytes(self) -> bytes:
        """Return the raw private key (for a device that keeps it in its own key store)."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, data: bytes | memoryview) -> bytes:
        """Return the 64-byte signature of ``data``."""
        return self._key.sign(bytes(data))


class PublicKeys:
    """Verifies signatures with raw public keys, keeping each parsed key for reuse."""

    MAX_CACHED = 100_000

    def __init__(self) -> None:
        self._parsed: dict[bytes, Ed25519PublicKey] = {}

    def verify(self, public_key: bytes, signature: bytes | memoryview, data: bytes) -> bool:
        """Return whether ``signature`` is ``public_key``'s over ``data``."""
        key = self._parsed.get(public_key)
        if key is None:
            try:
                key = Ed25519PublicKey.from_public_bytes(public_key)
            except ValueError:
                return False
            if len(self._parsed) >= self.MAX_CACHED:
                self._parsed.clear()  # bounded: a flood of keys cannot grow this
            self._parsed[public_key] = key
        try:
            key.verify(bytes(signature), data)
        except InvalidSignature:
            return False
        return True


def encode_key(raw: bytes) -> str:
    """Return raw key bytes as standard base64 text."""
    return base64.b64encode(raw).decode("ascii")


def decode_public_key(text: str) -> bytes:
    """Return the raw 32-byte public key of base64 ``text``, or raise ``IdentityError``."""
    raw = _decode_key(text)
    if len(raw) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"a public key is {PUBLIC_KEY_BYTES} bytes, not {len(raw)}")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise IdentityError(f"not an Ed25519 public key: {exc}") from exc
    return raw


def _decode_key(text: str) -> bytes:
    if not isinstance(text, str) or len(text) > 128:
        raise IdentityError("a key is base64 text of at most 128 characters")
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise IdentityError(f"not base64: {exc}") from exc


def _read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text()
    except OSError as exc:
        raise IdentityError(f"cannot read key file {path}: {exc}") from exc
    try:
        return _decode_key(text.strip())
    except IdentityError as exc:
        raise IdentityError(f"key file {path}: {exc}") from exc


class KeyRing:
    """Pinned public keys by sender name, safe to share between threads.

    ``reload`` (optional) returns the full set again, e.g. re-read from a key
    folder; a miss calls it at most once per ``reload_every_s``, so a worker
    started after the service is trusted without a restart, and a flood of
    unknown names costs no more than one read per interval. ``stamp``
    (optional) returns what changes when ``reload`` would find more (the
    folder's modification time): a miss reloads at once when it changed, so
    two workers starting together are both trusted at their first word.
    """

    def __init__(
        self,
        keys: Mapping[str, bytes] | None = None,
        *,
        reload: Callable[[], Mapping[str, bytes]] | None = None,
        reload_every_s: float = 2.0,
        stamp: Callable[[], object] | None = None,
    ) -> None:
        self._keys = dict(keys or {})
        self._reload = reload
        self._every = reload_every_s
        self._stamp = stamp or (lambda: None)
        self._last_stamp: object = None
        self._last_reload = -float("inf")
        self._lock = threading.Lock()
        if reload is not None:
            self._last_stamp = self._stamp()
            self._keys.update(reload())
            self._last_reload = time.monotonic()

    def __call__(self, name: str) -> bytes | None:
        """Return the key pinned for ``name`` (None: unknown)."""
        with self._lock:
            key = self._keys.get(name)
            if key is None and self._reload is not None:
                now, stamp = time.monotonic(), self._stamp()
                if now - self._last_reload >= self._every or stamp != self._last_stamp:
                    # The stamp is read before the keys: a key added in between
                    # changes it again, and the next miss reads once more.
                    self._last_reload, self._last_stamp = now, stamp
                    self._keys = {**self._keys, **self._reload()}
                    key = self._keys.get(name)
            return key

    def add(self, name: str, public_key: bytes) -> None:
        """Pin ``public_key`` for ``name``."""
        with self._lock:
            self._keys[name] = public_key

    def items(self) -> dict[str, bytes]:
        """Return every pinned key."""
        with self._lock:
            return dict(self._keys)
