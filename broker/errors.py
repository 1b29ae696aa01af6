"""Errors raised by the wire layer.

::

    BrokerError
    ├── CodecError            bytes that are not a FedMQ envelope or weights blob
    │   ├── SchemaVersionError    an envelope from a newer, unknown schema
    │   └── WeightsMismatch       weights whose names, shapes or dtypes differ from the model
    ├── TransportError        a transport cannot do what was asked
    │   ├── ConnectionLost        the connection to the broker went away
    │   ├── TlsError              the TLS handshake failed: a certificate that does not verify
    │   └── UnknownTransport      a broker URL with a scheme FedMQ does not speak
    ├── FetchError            an artifact could not be fetched
    │   └── ChecksumMismatch      an artifact's bytes do not hash to the promised sha256
    ├── IdentityError         a key that is not an Ed25519 key, or cannot be read
    └── Refused               a frame that fails verification: unsigned, forged, stale, oversized
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of every error the wire layer raises; ``code`` is its stable wire name."""

    code = "broker_error"


class CodecError(BrokerError):
    """Bytes that cannot be decoded into a message or weights."""


class SchemaVersionError(CodecError):
    """An envelope written with a schema version this code does not know."""


class WeightsMismatch(CodecError):
    """Weights whose names, shapes or dtypes do not match what was expected."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what
        """Which check failed: ``names``, ``shape`` or ``dtype``."""


class TransportError(BrokerError):
    """A transport operation failed."""


class ConnectionLost(TransportError):
    """The connection to the broker was lost."""


class TlsError(TransportError):
    """The TLS handshake failed for good: a certificate did not verify, or the peer refused ours."""


class UnknownTransport(TransportError):
    """A broker URL whose scheme has no transport."""


class FetchError(BrokerError):
    """An artifact could not be fetched from its URL."""

    code = "fetch_failed"


class ChecksumMismatch(FetchError):
    """Fetched bytes do not match the sha256 the reference promised."""

    code = "checksum_mismatch"


class IdentityError(BrokerError):
    """A key that cannot be read or is not an Ed25519 key."""

    code = "bad_identity"


class Refused(BrokerError):
    """A frame failed verification; ``reason`` is the counted refusal reason."""

    code = "refused"

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class AccessError(BrokerError):
    """The broker's users or permissions could not be changed (``broker.access``)."""

    code = "access_error"
