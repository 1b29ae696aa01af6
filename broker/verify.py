"""Checking what arrives: a frame is believed only when its sender's pinned key signed it.

The broker is a carrier, not a judge: anyone who can reach it may publish
anything. Each receiver therefore opens every frame with a ``Verifier`` that
knows which senders may speak to it (a lookup from sender name to pinned
public key) and how old a frame may be, and refuses the rest with a counted
reason. What a verified sender may *say* (an update only for its own task,
round control only from the service) is the receiver's next check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection
from enum import Enum
from typing import Any, TypeVar

from broker.codec import SIGNED_FRAME_VERSION, Frame, decode_frame, encode, parse_frame
from broker.errors import CodecError, Refused
from broker.identity import Identity, KeyLookup, PublicKeys
from broker.messages import Message, MessageKind, TaskGrant
from broker.transport import Delivery

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_FRAME_BYTES = 256 << 20
"""Largest frame any receiver opens (RabbitMQ's own limit is 128 MiB)."""
MAX_GRANT_CHARS = 4096


class Refusal(Enum):
    """Why a frame was not believed: the names counted in round records and ``/metrics``."""

    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    UNSIGNED = "unsigned"
    UNKNOWN_SENDER = "unknown_sender"
    BAD_SIGNATURE = "bad_signature"
    PAYLOAD_MISMATCH = "payload_mismatch"
    STALE = "stale"
    FROM_THE_FUTURE = "from_the_future"
    NOT_PERMITTED = "not_permitted"
    SPOOFED = "spoofed"
    BAD_GRANT = "bad_grant"


def refuse(reason: Refusal, detail: str) -> Refused:
    """Return the ``Refused`` error for ``reason``."""
    return Refused(reason.value, detail)


class Refusals:
    """Counts refused frames by reason and logs one line each (never a traceback).

    ``counts`` may be a counter the caller already keeps (a device's stats).
    """

    def __init__(self, component: str, counts: Counter[str] | None = None) -> None:
        self._component = component
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter() if counts is None else counts

    def admit(self, delivery: Delivery, opener: Callable[[Delivery], T]) -> T | None:
        """Return ``opener(delivery)``; a refused frame is counted, acked and gives None.

        Acked, not dead-lettered: a queue of forged frames would only grow.
        """
        try:
            return opener(delivery)
        except Refused as exc:
            self.count(exc, delivery.topic)
            delivery.ack()
            return None

    def count(self, error: Refused, topic: str) -> None:
        """Count ``error`` and log it in one line."""
        with self._lock:
            self.counts[error.reason] += 1
        log.warning("%s refused a frame on %s: %s", self._component, topic[:200], error)

    def snapshot(self) -> dict[str, int]:
        """Return the counts so far."""
        with self._lock:
            return dict(self.counts)


class Verifier:
    """Opens frames from one set of senders: signature, freshness and kind checked.

    Parameters
    ----------
    keys
        Sender name -> pinned raw public key (None: not a sender this receiver knows).
    kinds
        The message kinds these senders may send here; others are refused.
    max_age_s
        Frames signed longer ago than this are refused as stale (None: no
        limit, for messages that wait in durable queues and are bounded by
        their round instead).
    max_skew_s
        How far a sender's clock may run ahead of this one's.
    clock
        Seconds since the epoch (injectable for tests).
    topic_for
        The one topic a verified message may arrive on (e.g. its experiment's
        control topic); a message on another is refused as spoofed.
    """

    def __init__(
        self,
        keys: KeyLookup,
        *,
        kinds: Collection[MessageKind],
        max_age_s: float | None = 600.0,
        max_skew_s: float = 120.0,
        clock: Callable[[], float] = time.time,
        public_keys: PublicKeys | None = None,
        topic_for: Callable[[Any], str] | None = None,
    ) -> None:
        self._keys = keys
        self._kinds = frozenset(kind.value for kind in kinds)
        self._max_age = max_age_s
        self._max_skew = max_skew_s
        self._clock = clock
        self._public = public_keys or PublicKeys()
        self._topic_for = topic_for

    def open_delivery(self, delivery: Delivery) -> Message:
        """Return the message of a delivery this receiver may believe, or raise ``Refused``."""
        message = self.open(delivery.body)
        if self._topic_for is not None and delivery.topic != self._topic_for(message):
            raise refuse(Refusal.SPOOFED, f"{message.sender[:130]!r} wrote on another topic")
        return message

    def open(self, body: bytes | memoryview) -> Message:
        """Return the message of a frame this receiver may believe, or raise ``Refused``."""
        frame = parse(body)
        kind = frame.header.get("kind")
        if not isinstance(kind, str) or kind not in self._kinds:
            raise refuse(Refusal.NOT_PERMITTED, f"{str(kind)[:40]!r} is not accepted here")
        key = self._keys(frame.sender) if frame.sender else None
        if key is None:
            raise refuse(Refusal.UNKNOWN_SENDER, f"no key is pinned for {frame.sender[:130]!r}")
        check_signature(frame, key, self._public)
        message = to_message(frame)
        check_fresh(message, self._clock(), self._max_age, self._max_skew)
        return message


def parse(body: bytes | memoryview) -> Frame:
    """Split a frame for verification, refusing one that is oversized, unsigned or malformed."""
    if len(body) > MAX_FRAME_BYTES:
        raise refuse(Refusal.OVERSIZED, f"{len(body)} bytes")
    try:
        frame = parse_frame(body)
    except CodecError as exc:
        raise refuse(Refusal.MALFORMED, str(exc)[:200]) from exc
    if frame.signature is None:
        raise refuse(Refusal.UNSIGNED, "an unsigned frame")
    return frame


def check_signature(frame: Frame, public_key: bytes, keys: PublicKeys) -> None:
    """Raise ``Refused`` unless ``public_key`` signed ``frame`` and the payload is unchanged."""
    assert frame.signature is not None
    if not keys.verify(public_key, frame.signature, bytes(frame.signed_part)):
        raise refuse(Refusal.BAD_SIGNATURE, f"not signed by {frame.sender[:130]!r}'s key")
    digest = frame.header.get("payload_sha256")
    actual = hashlib.sha256(frame.payload).hexdigest()
    if not isinstance(digest, str) or not hmac.compare_digest(digest, actual):
        raise refuse(Refusal.PAYLOAD_MISMATCH, "the payload is not the one signed")


def to_message(frame: Frame) -> Message:
    """Build a parsed frame's message, refusing one whose body does not fit its type."""
    try:
        return decode_frame(frame)
    except CodecError as exc:
        raise refuse(Refusal.MALFORMED, str(exc)[:200]) from exc


def check_fresh(message: Message, now: float, max_age_s: float | None, max_skew_s: float) -> None:
    """Raise ``Refused`` if ``message`` was signed too long ago, or in the future."""
    if not isinstance(message.sent_at, float | int) or message.sent_at > now + max_skew_s:
        raise refuse(Refusal.FROM_THE_FUTURE, "sent_at is ahead of this receiver's clock")
    if max_age_s is not None and message.sent_at < now - max_age_s:
        raise refuse(Refusal.STALE, f"signed {now - message.sent_at:.0f} s ago")


def issue_grant(grant: TaskGrant, service: Identity) -> str:
    """Return ``grant`` signed by the service, as the text a task and its update carry."""
    return base64.b64encode(encode(grant, service)).decode("ascii")


def open_grant(text: str, service_key: bytes, keys: PublicKeys) -> TaskGrant:
    """Return the grant ``text`` carries if the pinned service key signed it, else raise."""
    if not isinstance(text, str) or not text or len(text) > MAX_GRANT_CHARS:
        raise refuse(Refusal.BAD_GRANT, "missing or oversized task grant")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise refuse(Refusal.BAD_GRANT, "the task grant is not base64") from exc
    frame = parse(raw)
    if frame.header.get("kind") != MessageKind.TASK_GRANT.value:
        raise refuse(Refusal.BAD_GRANT, "not a task grant")
    try:
        check_signature(frame, service_key, keys)
    except Refused as exc:
        raise refuse(Refusal.BAD_GRANT, f"the service did not sign it ({exc.reason})") from exc
    grant = to_message(frame)
    assert isinstance(grant, TaskGrant)
    return grant


__all__ = [
    "MAX_FRAME_BYTES",
    "SIGNED_FRAME_VERSION",
    "Refusal",
    "Refusals",
    "Verifier",
    "check_fresh",
    "check_signature",
    "issue_grant",
    "open_grant",
    "parse",
    "refuse",
    "to_message",
]
