"""Key agreement (X25519 + HKDF-SHA256) and authenticated encryption (AES-256-GCM).

Each pair of devices agrees on keys from their X25519 public keys: one to
encrypt the Shamir shares they send each other through the service, one to
seed their pairwise mask. ``context`` keeps those keys apart (and apart
across rounds): the same two key pairs give unrelated keys for different
contexts.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from broker.secagg.errors import SecAggError

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
INFO_PREFIX = b"fedmq-secagg/v1/"


class AgreementKey:
    """An X25519 private key for SecAgg key agreement.

    Parameters
    ----------
    private_key
        The key; make one with ``generate`` or ``from_private_bytes``.
    """

    def __init__(self, private_key: X25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> AgreementKey:
        """Return a fresh key."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> AgreementKey:
        """Return the key of 32 raw private bytes."""
        if len(raw) != KEY_BYTES:
            raise SecAggError(f"an X25519 private key is {KEY_BYTES} bytes, not {len(raw)}")
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """Return the 32 raw private bytes (what gets Shamir-shared)."""
        return self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def public_bytes(self) -> bytes:
        """Return the 32 raw public bytes."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def __repr__(self) -> str:
        # Never the private bytes: reprs end up in logs.
        return f"AgreementKey(public={self.public_bytes().hex()})"


def agree(own: AgreementKey, peer_public: bytes, *, context: bytes) -> bytes:
    """Return the 32-byte key ``own`` and the peer's key agree on for ``context``.

    Symmetric: ``agree(a, B, context=c) == agree(b, A, context=c)``.
    """
    if len(peer_public) != KEY_BYTES:
        raise SecAggError(f"an X25519 public key is {KEY_BYTES} bytes, not {len(peer_public)}")
    try:
        shared = own._key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        # A low-order point gives the all-zero secret, which cryptography refuses.
        raise SecAggError(f"unusable peer public key: {exc}") from exc
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=INFO_PREFIX + context)
    return hkdf.derive(shared)


def _aead(key: bytes) -> AESGCM:
    if len(key) != KEY_BYTES:
        raise SecAggError(f"an AES-256 key is {KEY_BYTES} bytes, not {len(key)}")
    return AESGCM(key)


def seal(key: bytes, plaintext: bytes, *, aad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext``; ``aad`` is authenticated, not sent.

    Returns
    -------
    bytes
        A random 12-byte nonce, then the ciphertext and its 16-byte tag.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + _aead(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, *, aad: bytes) -> bytes:
    """Return the plaintext of a ``seal``ed blob, or raise if it was tampered with."""
    aead = _aead(key)
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise SecAggError(f"a sealed blob of {len(blob)} bytes is too short")
    try:
        return aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise SecAggError("sealed blob does not authenticate (wrong key, aad or bytes)") from exc
