"""Whatever arrives, a receiver raises only its own two errors: ``CodecError`` and ``Refused``.

Three sources of frames, generated: arbitrary bytes; arbitrary JSON headers
behind a valid prefix (unsigned, with a random signature, and signed by the
pinned key itself, so the body's parsing runs after verification too); and
mutations of valid signed frames, none of which may be believed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.codec import SIGNED_FRAME_VERSION, decode, encode
from broker.errors import CodecError, Refused
from broker.identity import SIGNATURE_BYTES, Identity
from broker.messages import MESSAGE_TYPES, Message, MessageKind
from broker.verify import Verifier
from tests.broker.test_codec import SAMPLES

SIGNER = Identity.generate("d1")
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _verifier() -> Verifier:
    keys = {SIGNER.name: SIGNER.public_key}
    # No age limit and the real clock: the sample frames were signed when this module loaded.
    return Verifier(keys.get, kinds=tuple(MessageKind), max_age_s=None)


VERIFIER = _verifier()


def _decode_or_codec_error(frame: bytes) -> Message | None:
    """Return the decoded message, or None for a ``CodecError``; anything else propagates."""
    try:
        return decode(frame)
    except CodecError:
        return None


def _open_or_refused(frame: bytes) -> Message | None:
    """Return the verified message, or None for a ``Refused``; anything else propagates."""
    try:
        return VERIFIER.open(frame)
    except Refused:
        return None


def _prefix(version: int, length: int) -> bytes:
    return struct.pack(">3sBI", b"FMQ", version, length)


# -- generated inputs ----------------------------------------------------------

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)  # beyond a float
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

_FIELDS = sorted(
    {f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)}
    | {"uri", "sha256", "size", "format"}
)
_KEYS = st.sampled_from(_FIELDS) | st.text(max_size=8)


def _sample_headers() -> list[dict[str, Any]]:
    """Return the real headers of every sample message, as a starting point to mutate."""
    headers = []
    for message in SAMPLES:
        frame = encode(message)
        (length,) = struct.unpack(">I", frame[4:8])
        headers.append(json.loads(frame[8 : 8 + length]))
    return headers


_SAMPLE_HEADERS = _sample_headers()


@st.composite
def _mutated_json(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """Return ``value`` with one part somewhere inside it replaced, dropped or added."""
    if isinstance(value, dict) and value and depth < 4 and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: draw(_mutated_json(value[key], depth + 1))}
    if isinstance(value, list) and value and depth < 4 and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        return [*value[:i], draw(_mutated_json(value[i], depth + 1)), *value[i + 1 :]]
    action = draw(st.sampled_from(["replace", "drop", "add"]))
    if action == "drop" and isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        return {k: v for k, v in value.items() if k != key}
    if action == "add" and isinstance(value, dict):
        return {**value, draw(_KEYS): draw(JSON)}
    return draw(JSON)


@st.composite
def headers(draw: st.DrawFn) -> Any:
    """Return a JSON header: a real one mutated, one shaped like one, or any JSON at all."""
    shape = draw(st.sampled_from(["mutated", "shaped", "any"]))
    if shape == "mutated":
        return draw(_mutated_json(draw(st.sampled_from(_SAMPLE_HEADERS))))
    if shape == "shaped":
        kind = draw(st.sampled_from([k.value for k in MessageKind]) | st.text(max_size=8))
        body = draw(st.dictionaries(_KEYS, JSON, max_size=8) | JSON)
        envelope = draw(st.dictionaries(_KEYS, JSON, max_size=4))
        version = draw(st.just(1) | JSON)
        field = draw(st.none() | st.sampled_from(_FIELDS) | JSON)
        return {
            **envelope,
            "schema_version": version,
            "kind": kind,
            "body": body,
            "payload_field": field,
        }
    return draw(JSON)


def _signed_raw(raw: bytes, payload: bytes = b"") -> bytes:
    """Return header text ``raw`` and ``payload`` as a frame the pinned key really signed."""
    signed = _prefix(SIGNED_FRAME_VERSION, len(raw)) + raw
    return signed + SIGNER.sign(signed) + payload


def _signed(header: Any, payload: bytes) -> bytes:
    """Return ``header`` and ``payload`` as a frame the pinned key really signed."""
    if isinstance(header, dict):
        header = {**header, "sender": SIGNER.name}
        header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    return _signed_raw(json.dumps(header, allow_nan=False).encode(), payload)


# -- properties ----------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=512))
@example(b"")
@example(b"FMQ\x02\x00\x00\x00\x02{}")
@example(b"FMQ\x02\xff\xff\xff\xff")
def test_arbitrary_bytes_raise_only_codec_errors_and_refusals(data: bytes) -> None:
    _decode_or_codec_error(data)
    assert _open_or_refused(data) is None  # nothing unsigned by the pinned key is believed


@PROPERTY
@given(st.sampled_from([1, SIGNED_FRAME_VERSION]), st.binary(max_size=256), st.binary(max_size=64))
def test_arbitrary_bytes_behind_a_valid_prefix_raise_only_codec_errors_and_refusals(
    version: int, header: bytes, rest: bytes
) -> None:
    frame = _prefix(version, len(header)) + header + rest

    _decode_or_codec_error(frame)
    assert _open_or_refused(frame) is None


@PROPERTY
@given(headers(), st.binary(max_size=32), st.binary(min_size=64, max_size=64))
@example(
    {"schema_version": 1, "kind": "close_round", "sent_at": 10**400, "body": {}}, b"", b"\0" * 64
)
def test_arbitrary_json_headers_raise_only_codec_errors_and_refusals(
    header: Any, payload: bytes, signature: bytes
) -> None:
    raw = json.dumps(header).encode()
    unsigned = _prefix(1, len(raw)) + raw + payload
    forged = _prefix(SIGNED_FRAME_VERSION, len(raw)) + raw + signature + payload

    for frame in (unsigned, forged):
        _decode_or_codec_error(frame)
        assert _open_or_refused(frame) is None


@PROPERTY
@given(headers(), st.binary(max_size=32))
@example({"schema_version": 1, "kind": "close_round", "sent_at": 10**400, "body": {}}, b"")
@example(
    {"schema_version": 1, "kind": "close_round", "body": {"experiment_id": "e", "round": 1}}, b""
)
def test_headers_the_pinned_key_signed_raise_only_codec_errors_and_refusals(
    header: Any, payload: bytes
) -> None:
    try:
        frame = _signed(header, payload)
    except ValueError:  # a non-finite float: JSON cannot carry it, so no sender can sign it
        return

    decoded = _decode_or_codec_error(frame)
    opened = _open_or_refused(frame)

    if opened is not None:  # believed: it is what decoding the signed frame gives
        assert decoded is not None and opened.sender == SIGNER.name
        # (an envelope field the header leaves out gets a fresh default on each decode)
        fresh = {f: getattr(decoded, f) for f in ("message_id", "sent_at") if f not in header}
        assert dataclasses.replace(opened, **fresh) == decoded


_EMPTY = hashlib.sha256(b"").hexdigest()
_BEYOND_A_FLOAT = [
    '{"schema_version":1e400,"kind":"close_round","body":{"experiment_id":"e","round":1}}',
    '{"schema_version":1,"kind":"close_round","sent_at":1' + "0" * 400 + ","
    '"body":{"experiment_id":"e","round":1}}',
    '{"schema_version":1,"kind":"close_round","sent_at":-1e400,'
    '"body":{"experiment_id":"e","round":1}}',
    '{"schema_version":1,"kind":"update_rejected","body":{"experiment_id":"e","round":1,'
    '"update_id":"u","reason":"stale"},"sent_at":1e999}',
]


@given(
    st.sampled_from(_BEYOND_A_FLOAT),
    st.sampled_from(["", ',"sender":"d1","payload_sha256":"' + _EMPTY + '"']),
)
@settings(max_examples=20, deadline=None)
def test_numbers_beyond_a_float_raise_only_codec_errors_and_refusals(
    text: str, signer: str
) -> None:
    raw = (text[:-1] + signer + "}").encode()

    for frame in (_prefix(1, len(raw)) + raw, _signed_raw(raw)):
        _decode_or_codec_error(frame)
        assert _open_or_refused(frame) is None  # unsigned, or a number no message holds


_FRAMES = [encode(message, SIGNER) for message in SAMPLES]


@st.composite
def mutations(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """Return a valid signed frame and a mutation of it (bytes flipped, cut, added, spliced)."""
    frame = draw(st.sampled_from(_FRAMES))
    data = bytearray(frame)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif action == "truncate":
            del data[at:]
        else:  # a piece of another valid frame
            other = draw(st.sampled_from(_FRAMES))
            start = draw(st.integers(0, len(other) - 1))
            data[at : at + 16] = other[start : start + 16]
    return frame, bytes(data)


@PROPERTY
@given(mutations())
def test_mutated_signed_frames_are_refused_and_raise_nothing_else(
    pair: tuple[bytes, bytes],
) -> None:
    original, mutated = pair

    _decode_or_codec_error(mutated)
    opened = _open_or_refused(mutated)

    if mutated == original:
        assert opened is not None
    else:
        assert opened is None, "a changed frame was believed"


def test_the_signature_covers_exactly_the_bytes_the_codec_says() -> None:
    frame = _FRAMES[0]
    (length,) = struct.unpack(">I", frame[4:8])

    assert SIGNATURE_BYTES == 64
    assert _open_or_refused(frame) is not None
    assert _open_or_refused(frame[: 8 + length] + bytes(64) + frame[8 + length + 64 :]) is None
