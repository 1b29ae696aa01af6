"""What the mobile schemas say beyond the message classes (read by ``broker.schema_gen``).

The header keys the codec adds, the definitions several fields share, and who
sends each phone-facing kind on which topic. The messages' own fields are
described where they are declared, in ``broker.messages``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker import topics
from broker.codec import SIGNED_FRAME_VERSION
from broker.identity import SERVICE_NAME, SIGNATURE_BYTES
from broker.messages import MessageKind, Scalar
from broker.verify import MAX_GRANT_CHARS

ENVELOPE = (
    "The UTF-8 JSON header of every FedMQ frame on the bus. A frame (frame version "
    f'{SIGNED_FRAME_VERSION}, signed) is b"FMQ" | 0x{SIGNED_FRAME_VERSION:02x} | u32 big-endian '
    f"header length H | header (H bytes, this object) | {SIGNATURE_BYTES}-byte Ed25519 signature"
    " | payload. The signature is over the frame's first 8 + H bytes exactly as sent (prefix "
    "and header), made with the private key of the party the header's sender names; the "
    "payload is covered through payload_sha256. Every receiver refuses unsigned (version 1), "
    "forged and stale frames. The header carries the envelope fields shared by every message "
    'and the message\'s own fields under "body". Topics are under a namespace, fedmq by '
    "default (FEDMQ_NAMESPACE). Schemas describe what a writer must write: every key, nothing "
    "else; a field's default is the value FedMQ's reader assumes when the field is absent. A "
    "phone ignores keys it does not know; FedMQ's reader ignores unknown header keys but "
    "refuses an unknown body or ModelRef field (see docs/mobile-protocol.md, Compatibility). "
    "Integers are written without a fraction or exponent (4, never 4.0): JSON Schema counts "
    "4.0 as an integer, FedMQ's reader refuses it. The $id URLs are names, not download "
    "locations: resolve them to the files next to this one."
)
SCHEMA_VERSION = (
    "Version of the message vocabulary (broker.messages.SCHEMA_VERSION). A reader refuses a "
    "header whose version is higher than the one it implements."
)
KIND = (
    "What the message is (broker.messages.MessageKind); selects the schema of the body. Kinds "
    "a phone never sees as a frame of their own are listed too, so that the header schema "
    "covers every frame on the bus (task_grant travels inside a train_task, base64-encoded)."
)
BODY = "The message's own fields; the schema of each kind (kind.json) describes them."
PAYLOAD_FIELD = (
    "The name of the body field whose bytes follow the header as the binary payload, or null "
    'when the frame ends with the header. Only model_update uses it ("inline_weights").'
)
PAYLOAD_SHA256 = (
    "SHA-256 of the payload (the bytes after the signature) as 64 lowercase hex digits; of the "
    "empty string (e3b0c442...b855) when the frame has no payload. A receiver refuses a frame "
    "whose payload does not hash to it (payload_mismatch)."
)


@dataclass(frozen=True)
class Shared:
    """A definition fields refer to by name (``"$ref"`` in their ``WIRE`` metadata)."""

    home: str
    """The schema file it is defined in."""
    python: type
    """The type of the fields it narrows."""
    keywords: Mapping[str, Any]
    """Its description and constraints (its JSON type follows from ``python``)."""


SHARED: Mapping[str, Shared] = {
    "message_id": Shared("envelope", str, {"minLength": 1}),
    "segment": Shared(
        "envelope",
        str,
        {
            "description": "An id that is used as one topic segment: a device id or an "
            "experiment id (broker.topics).",
            "pattern": topics._SEGMENT.pattern,
        },
    ),
    "unix_time": Shared(
        "envelope", float, {"description": "Seconds since the Unix epoch.", "minimum": 0}
    ),
    "public_key": Shared(
        "envelope",
        str,
        {
            "description": "A public key (Ed25519; X25519 in secure aggregation's stages): the "
            "standard, padded base64 of its 32 raw bytes (44 characters).",
            "pattern": "^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$",
        },
    ),
    "grant": Shared(
        "envelope",
        str,
        {
            "description": "A task grant: the standard, padded base64 of a whole signed "
            "task_grant frame (task_grant.json), as the service issued it. Devices copy it "
            f"unchanged; FedMQ's reader refuses one longer than {MAX_GRANT_CHARS} characters.",
            "minLength": 1,
            "maxLength": MAX_GRANT_CHARS,
            "pattern": "^[A-Za-z0-9+/]*={0,2}$",
        },
    ),
    "sha256": Shared("model_ref", str, {"pattern": "^[0-9a-f]{64}$"}),
    "uri": Shared(
        "model_ref",
        str,
        {
            "description": "An absolute URL (scheme://...).",
            "format": "uri",
            "pattern": "^[A-Za-z][A-Za-z0-9+.\\-]*://\\S+$",
        },
    ),
}
"""Definitions of narrowed strings and numbers, by the name fields give in ``"$ref"``."""

SHARED_TYPES: Mapping[Any, tuple[str, str]] = {
    Scalar: ("scalar", "A JSON number, string or boolean (never null, an array or an object)."),
    Mapping[str, Scalar]: ("settings", "A flat map from names to scalars."),
    Mapping[str, float]: (
        "metrics",
        "A flat map from metric names to finite numbers (JSON has no NaN or Infinity).",
    ),
}
"""Types every field of which refers to one definition in ``envelope.json``: name, description."""


@dataclass(frozen=True)
class Route:
    """Who sends a kind to whom, on which topic, and what that says of its header."""

    note: str
    """The title's parenthesis: direction and topic."""
    sender: Mapping[str, Any]
    """The schema of the header's ``sender``."""
    reply_to: Mapping[str, Any] | None = None
    """The schema of the header's ``reply_to``, when the kind says more than the envelope."""


def _topic(topic: str) -> str:
    return topic.replace("DEVICE_ID", "<device_id>").replace("EXPERIMENT_ID", "<experiment_id>")


_TOPICS = topics.Topics()
CHECKIN = _topic(_TOPICS.checkin("DEVICE_ID"))
DEVICE = _topic(_TOPICS.device("DEVICE_ID"))
UPDATES = _topic(_TOPICS.updates("EXPERIMENT_ID", "DEVICE_ID"))

_BY_SERVICE = {
    "description": f'Always "{SERVICE_NAME}": the name the service signs as. A device verifies '
    "the frame with the service key it pinned at registration (service_key) and refuses it "
    "otherwise.",
    "const": SERVICE_NAME,
}


def _by_device(checks: str) -> dict[str, Any]:
    return {
        "description": f"The device's id: the frame is verified with {checks}.",
        "$ref": "envelope.json#/$defs/segment",
    }


_REGISTERED = _by_device(
    "the public key registered for it, and it must equal body.device_id and the topic's last "
    "segment"
)
ROUTES: Mapping[MessageKind, Route] = {
    MessageKind.CHECK_IN: Route(f"device -> coordinator, topic {CHECKIN}", _REGISTERED),
    MessageKind.CHECK_OUT: Route(f"device -> coordinator, topic {CHECKIN}", _REGISTERED),
    MessageKind.TRAIN_TASK: Route(
        f"coordinator -> device, topic {DEVICE}",
        _BY_SERVICE,
        {
            "description": f"The device's own update topic, {UPDATES}: the only one its broker "
            "user may publish updates to.",
            "type": "string",
        },
    ),
    MessageKind.COME_BACK_LATER: Route(f"coordinator -> device, topic {DEVICE}", _BY_SERVICE),
    MessageKind.MODEL_UPDATE: Route(
        f"device -> aggregator workers, topic {UPDATES}",
        _by_device(
            "the public key the task's grant names, and it must equal body.device_id and the "
            "grant's device_id"
        ),
    ),
    MessageKind.ERROR_REPLY: Route(
        f"device -> aggregator workers, topic {UPDATES}",
        _by_device(
            "the public key the task's grant names, and it must equal the grant's device_id"
        ),
    ),
    MessageKind.UPDATE_REJECTED: Route(
        f"aggregator worker -> device, topic {DEVICE}",
        {
            "description": "The worker's name: a key of the latest train_task's aggregator_keys, "
            "whose public key must verify the signature.",
            "type": "string",
            "minLength": 1,
        },
    ),
    MessageKind.TASK_GRANT: Route(
        f"{SERVICE_NAME}, inside train_task.grant; returned in model_update.grant and "
        "error_reply.grant",
        _BY_SERVICE,
    ),
    MessageKind.SECAGG_KEYS: Route(f"device -> coordinator, topic {CHECKIN}", _REGISTERED),
    MessageKind.SECAGG_NEIGHBOURS: Route(f"coordinator -> device, topic {DEVICE}", _BY_SERVICE),
    MessageKind.SECAGG_SHARES: Route(f"device -> coordinator, topic {CHECKIN}", _REGISTERED),
    MessageKind.SECAGG_DELIVERY: Route(f"coordinator -> device, topic {DEVICE}", _BY_SERVICE),
    MessageKind.SECAGG_UNMASK: Route(f"coordinator -> device, topic {DEVICE}", _BY_SERVICE),
    MessageKind.SECAGG_REVEAL: Route(f"device -> coordinator, topic {CHECKIN}", _REGISTERED),
}
"""The phone-facing kinds' routes; a kind without one is only checked against the envelope."""
