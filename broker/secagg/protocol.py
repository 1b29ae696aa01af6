"""What a device and the service must agree on, byte for byte, beyond the primitives.

The key-derivation contexts, the associated data binding an encrypted share
to its sender and recipient, the layout of a share pair, which side of a
pair adds the pairwise mask, and how keys are written in messages. An app
implementing the stages reproduces exactly these (docs/mobile-protocol.md).
"""

from __future__ import annotations

import base64
import binascii

from broker.secagg.errors import SecAggError
from broker.secagg.shamir import SHARE_BYTES

SHARE_PAIR_BYTES = 2 * SHARE_BYTES
"""A sealed share's plaintext: the self-mask seed's share, then the mask key's."""
SEED_BYTES = 32
"""Self-mask seeds and pairwise seeds are 32 bytes (AES-256 keys of the mask generator)."""


def mask_context(experiment_id: str, round_number: int) -> bytes:
    """Return the HKDF context of a round's pairwise mask seeds."""
    return f"mask|{experiment_id}|{round_number}".encode()


def cipher_context(experiment_id: str, round_number: int) -> bytes:
    """Return the HKDF context of a round's share-encryption keys."""
    return f"cipher|{experiment_id}|{round_number}".encode()


def share_aad(experiment_id: str, round_number: int, sender: str, recipient: str) -> bytes:
    """Return the associated data of a share ``sender`` encrypted for ``recipient``.

    A share moved to another pair of devices, round or experiment fails to open.
    """
    return f"share|{experiment_id}|{round_number}|{sender}|{recipient}".encode()


def pair_sign(own: str, peer: str) -> int:
    """Return how ``own`` applies the mask it shares with ``peer``: +1 adds, -1 subtracts.

    The device whose id sorts first (by code point) adds, the other
    subtracts, so a pair's masks cancel in the sum.
    """
    if own == peer:
        raise SecAggError("a device shares no pairwise mask with itself")
    return 1 if own < peer else -1


def b64(data: bytes) -> str:
    """Return standard base64 with padding, as every key and share travels."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str, *, size: int | None = None, what: str = "value") -> bytes:
    """Return the bytes of standard base64 ``text``; ``SecAggError`` if malformed or mis-sized."""
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, AttributeError) as exc:
        raise SecAggError(f"{what} is not base64") from exc
    if size is not None and len(data) != size:
        raise SecAggError(f"{what} must be {size} bytes, got {len(data)}")
    return data
