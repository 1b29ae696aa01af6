"""One codec for every platform: a JSON header followed by an optional binary payload.

Frame layout (all integers big-endian)::

    unsigned (version 1):  b"FMQ" | 0x01 | u32 header length | header | payload
    signed   (version 2):  b"FMQ" | 0x02 | u32 header length | header | signature | payload

The header holds ``schema_version``, ``kind``, the envelope fields and the
message ``body``; a message's single ``bytes`` field (an update's inline
weights) travels as the payload so it is never base64-inflated. A signed
frame's header also holds ``payload_sha256``, and its 64-byte Ed25519
signature is over the frame's first ``8 + header length`` bytes (prefix and
header, as sent): so it covers every field and, through the digest, the
payload, and a verifier needs no canonical JSON. The header's ``sender``
names the key that signed it. Every receiver refuses unsigned frames
(``broker.verify``); version 1 remains for tools and tests that look at
frames by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import struct
import types
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, Union, get_args, get_origin, get_type_hints

from broker.errors import CodecError, SchemaVersionError
from broker.identity import SIGNATURE_BYTES, Identity
from broker.messages import MESSAGE_TYPES, SCHEMA_VERSION, Message, MessageKind
from broker.secagg.messages import SECAGG_MESSAGE_TYPES

_MAGIC = b"FMQ"
_FRAME_VERSION = 1
SIGNED_FRAME_VERSION = 2
_PREFIX = struct.Struct(">3sBI")
_ENVELOPE_FIELDS = ("message_id", "sender", "sent_at", "reply_to")
MAX_HEADER_BYTES = 1 << 20
"""Largest header accepted: a 1,000-device round announcement is ~100 KB."""


@dataclasses.dataclass(frozen=True)
class Frame:
    """A frame split into its parts, before any signature is checked."""

    header: dict[str, Any]
    payload: memoryview
    signed_part: memoryview
    """The bytes a signature covers: prefix and header."""
    signature: memoryview | None
    """The Ed25519 signature of a version-2 frame; None for an unsigned one."""

    @property
    def sender(self) -> str:
        """Return the sender named in the header ("" when absent or not a string)."""
        sender = self.header.get("sender")
        return sender if isinstance(sender, str) else ""


ALL_MESSAGE_TYPES: Mapping[MessageKind, type[Message]] = {
    **MESSAGE_TYPES,
    **SECAGG_MESSAGE_TYPES,
}
"""The class of every kind a frame may carry: the core vocabulary and secure aggregation's stages.

``broker.messages.MESSAGE_TYPES`` holds only the core: ``broker.secagg.messages``
imports ``broker.messages``, so the stages are merged here, where both are known.
"""


def encode(message: Message, identity: Identity | None = None) -> bytes:
    """Serialise a message to one frame, signed by ``identity`` when one is given.

    A signed frame names ``identity.name`` as its sender, whatever the
    message's own ``sender`` field says.
    """
    body: dict[str, Any] = {}
    payload: bytes | memoryview = b""
    payload_field: str | None = None
    for f in dataclasses.fields(message):
        if f.name in _ENVELOPE_FIELDS:
            continue
        value = getattr(message, f.name)
        if isinstance(value, bytes | memoryview):
            if payload_field is not None:
                raise CodecError(f"{type(message).__name__} has more than one bytes field")
            payload, payload_field = value, f.name
            continue
        body[f.name] = _to_json(value)
    header = {
        "schema_version": SCHEMA_VERSION,
        "kind": message.KIND.value,
        **{name: getattr(message, name) for name in _ENVELOPE_FIELDS},
        "body": body,
        "payload_field": payload_field,
    }
    if identity is None:
        raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        return b"".join((_PREFIX.pack(_MAGIC, _FRAME_VERSION, len(raw)), raw, payload))
    header["sender"] = identity.name
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    signed = _PREFIX.pack(_MAGIC, SIGNED_FRAME_VERSION, len(raw)) + raw
    return b"".join((signed, identity.sign(signed), payload))


def split_frame(frame: bytes | memoryview) -> tuple[dict[str, Any], memoryview]:
    """Split a frame into its parsed JSON header and its binary payload, as any client would.

    Parameters
    ----------
    frame
        One message as it travels on the bus, signed or not.

    Returns
    -------
    tuple
        ``(header, payload)``; the payload is a view of ``frame``, not a copy
        (empty when the message has no binary field).

    Raises
    ------
    CodecError
        The bytes are not a FedMQ frame, or the header is not a JSON object.
    """
    parsed = parse_frame(frame)
    return parsed.header, parsed.payload


def parse_frame(frame: bytes | memoryview) -> Frame:
    """Split a frame into header, payload and signature; raise ``CodecError`` if it is not one."""
    view = memoryview(frame).cast("B")
    if len(view) < _PREFIX.size:
        raise CodecError("frame shorter than its prefix")
    magic, version, length = _PREFIX.unpack_from(view)
    if magic != _MAGIC or version not in (_FRAME_VERSION, SIGNED_FRAME_VERSION):
        raise CodecError("not a FedMQ frame")
    if length > MAX_HEADER_BYTES:
        raise CodecError(f"header of {length} bytes exceeds {MAX_HEADER_BYTES}")
    end = _PREFIX.size + length
    if end > len(view):
        raise CodecError("frame truncated inside its header")
    try:
        header = _HEADER.decode(bytes(view[_PREFIX.size : end]).decode())
    except RecursionError as exc:  # nesting deeper than the parser's stack
        raise CodecError("bad header: nested too deeply") from exc
    except ValueError as exc:
        raise CodecError(f"bad header: {exc}") from exc
    if not isinstance(header, dict):
        raise CodecError("bad header: not a JSON object")
    if version == _FRAME_VERSION:
        return Frame(header, view[end:], view[:end], None)
    if end + SIGNATURE_BYTES > len(view):
        raise CodecError("frame truncated inside its signature")
    signature = view[end : end + SIGNATURE_BYTES]
    return Frame(header, view[end + SIGNATURE_BYTES :], view[:end], signature)


def decode(frame: bytes | memoryview) -> Message:
    """Parse one frame back into its typed message; raise ``CodecError`` if it is not one.

    This checks no signature: receivers go through ``broker.verify``.
    """
    return decode_frame(parse_frame(frame))


def decode_frame(frame: Frame) -> Message:
    """Build the typed message of a parsed frame; raise ``CodecError`` if it is not one."""
    header, payload = frame.header, frame.payload
    try:
        kind = MessageKind(header["kind"])
        schema = header["schema_version"]
        if type(schema) is not int:
            raise TypeError("schema_version must be an integer")
    except (ValueError, KeyError, TypeError) as exc:
        raise CodecError(f"bad header: {exc}") from exc
    if schema > SCHEMA_VERSION:
        raise SchemaVersionError(f"schema {schema} is newer than {SCHEMA_VERSION}")
    cls = ALL_MESSAGE_TYPES[kind]
    envelope = {name: header[name] for name in _ENVELOPE_FIELDS if name in header}
    body = header.get("body", {})
    if not isinstance(body, dict):
        raise CodecError(f"bad {kind.value} body: not an object")
    kwargs = _from_json_fields(cls, {**body, **envelope})
    payload_field = header.get("payload_field")
    if payload_field:
        if not isinstance(payload_field, str) or payload_field not in _binary_fields(cls):
            raise CodecError(f"{cls.__name__} has no binary field {str(payload_field)[:40]!r}")
        # A view, not a copy: a large inline update is read in place by the weights codec.
        kwargs[payload_field] = payload
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CodecError(f"bad {kind.value} body: {exc}") from exc


def _to_json(value: Any) -> Any:
    """Turn a field value into JSON-ready data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_json(v) for v in value]
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Return a class's resolved type hints, cached: resolving them costs more than a decode."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls)
    return hints


_BINARY: dict[type, frozenset[str]] = {}


def _binary_fields(cls: type[Message]) -> frozenset[str]:
    """Return the names of ``cls``'s fields that may carry the frame's binary payload."""
    names = _BINARY.get(cls)
    if names is None:
        hints = _hints(cls).items()
        names = _BINARY[cls] = frozenset(name for name, hint in hints if "bytes" in str(hint))
    return names


def _from_json_fields(cls: type[Message], body: Mapping[str, Any]) -> dict[str, Any]:
    """Rebuild a message's keyword arguments from its JSON body using its type hints."""
    hints = _hints(cls)
    try:
        return {name: _converter(hints[name])(value) for name, value in body.items()}
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise CodecError(f"bad {cls.__name__} body: {exc}") from exc


Convert = Callable[[Any], Any]


@functools.cache
def _converter(hint: Any) -> Convert:
    """Return a function turning JSON data into ``hint``'s type, refusing values of other types.

    Built once per hint: reading the hint (``get_origin``, ``get_args``, the
    dataclass's fields) on every field of every frame cost a worker more than
    the rest of decoding an update.
    """
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(hint) if a is not type(None)]
        inner = (
            _converter(options[0])
            if len(options) == 1
            else _scalar_converter(tuple(o for o in options if o in _SCALARS))
        )
        if len(options) == len(get_args(hint)):
            return inner
        return lambda value: None if value is None else inner(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _dataclass_converter(hint)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return hint
    if origin is tuple:
        item = _converter(get_args(hint)[0])
        return lambda value: tuple(item(v) for v in _array(value))
    if origin is Mapping or origin is dict:
        args = get_args(hint)
        value_of = _converter(args[1] if len(args) == 2 else Any)
        return lambda value: {k: value_of(v) for k, v in _object(value).items()}
    if hint in _SCALARS:
        return _scalar_converter((hint,))
    return _identity


def _dataclass_converter(cls: type) -> Convert:
    """Return a converter building ``cls`` from a JSON object (its hints resolved lazily)."""

    def convert(value: Any) -> Any:
        hints = _hints(cls)
        return cls(**{k: _converter(hints[k])(v) for k, v in _object(value).items()})

    return convert


def _scalar_converter(allowed: tuple[type, ...]) -> Convert:
    """Return a converter accepting the ``allowed`` JSON scalars, quick on the exact type."""
    # float is left out: an int is a valid float field (and becomes a float).
    exact = allowed[0] if len(allowed) == 1 and allowed[0] is not float else None

    def convert(value: Any) -> Any:
        if type(value) is exact:  # the common case: a str field holding a str
            return value
        return _scalar(value, allowed)

    return convert


def _identity(value: Any) -> Any:
    return value


_SCALARS = (bool, int, float, str)


def _scalar(value: Any, allowed: tuple[type, ...]) -> Any:
    """Return ``value`` if it is one of the ``allowed`` JSON scalars (a finite float)."""
    if isinstance(value, bool):
        ok = bool in allowed
    elif isinstance(value, int):
        ok = int in allowed or float in allowed
        if ok and int not in allowed:
            value = float(value)
    elif isinstance(value, float):
        ok = float in allowed and math.isfinite(value)
    else:
        ok = isinstance(value, str) and str in allowed
    if not ok:
        names = "/".join(t.__name__ for t in allowed)
        raise TypeError(f"expected {names}, got {value!r}")
    return value


def _array(value: Any) -> list[Any]:
    """Return ``value`` if it is a JSON array."""
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return value


def _object(value: Any) -> dict[str, Any]:
    """Return ``value`` if it is a JSON object."""
    if not isinstance(value, dict):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    return value


def _refuse_constant(name: str) -> Any:
    """Refuse NaN and Infinity, which JSON does not have but Python's parser accepts."""
    raise ValueError(f"{name} is not valid JSON")


_HEADER = json.JSONDecoder(parse_constant=_refuse_constant)
