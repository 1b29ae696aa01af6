from __future__ import annotations

import dataclasses
import hashlib
import json
import struct

import numpy as np
import pytest

from broker import (
    CheckIn,
    CheckOut,
    CloseRound,
    CodecError,
    CombineRound,
    ComeBackLater,
    ErrorReply,
    Message,
    ModelRef,
    ModelUpdate,
    PartialReady,
    RejectReason,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    RoundProgress,
    SchemaVersionError,
    StrategySpec,
    TrainTask,
    UpdateRejected,
    WeightsMismatch,
    WorkerAlive,
    decode,
    decode_weights,
    encode,
    encode_weights,
    weights_spec,
)
from broker.codec import MAX_HEADER_BYTES, SIGNED_FRAME_VERSION, parse_frame
from broker.errors import Refused
from broker.identity import SIGNATURE_BYTES, Identity, PublicKeys
from broker.messages import MESSAGE_TYPES, MessageKind, TaskGrant
from broker.verify import Refusal, Verifier, check_signature

REF = ModelRef("file:///tmp/w", "ab" * 32, 10)

SAMPLES: list[Message] = [
    CheckIn(device_id="d1", platform="android", capabilities={"ram_mb": 2048}),
    TrainTask(
        experiment_id="e",
        round=3,
        base_version=2,
        model=REF,
        artifacts={"model.onnx": ModelRef("file:///x", "cd" * 32, 5, "onnx")},
        training={"lr": 0.1, "epochs": 2, "optimizer": "sgd"},
        deadline_at=12.5,
        reply_to="fedmq/updates/e/d1",
        grant="c2lnbmVkIGdyYW50",
        aggregator_keys={"worker-1": "A" * 43 + "="},
    ),
    CheckOut(device_id="d1", reason="connection lost"),
    ComeBackLater(experiment_id="e", retry_after_s=30.0, reason="busy"),
    ModelUpdate(
        experiment_id="e",
        round=3,
        device_id="d1",
        base_version=2,
        task_id="t",
        num_examples=7,
        inline_weights=b"\x00\x01binary\xff",
        metrics={"loss": 0.5},
        grant="c2lnbmVkIGdyYW50",
    ),
    ModelUpdate(
        experiment_id="e",
        round=3,
        device_id="d1",
        base_version=2,
        task_id="t",
        num_examples=7,
        weights=REF,
    ),
    UpdateRejected(
        experiment_id="e",
        round=3,
        update_id="u",
        reason=RejectReason.NON_FINITE,
        detail="w holds NaN",
    ),
    ErrorReply(in_reply_to="t", code="checksum_mismatch", detail="x", grant="c2lnbmVk"),
    RoundOpened(
        experiment_id="e",
        round=1,
        base_version=0,
        model=REF,
        selected=("a", "b"),
        target_reports=2,
        min_reports=1,
        deadline_at=5.0,
        strategy=StrategySpec("fedavg"),
    ),
    CloseRound(experiment_id="e", round=1),
    RoundCommitted(
        experiment_id="e",
        round=1,
        version=1,
        model=REF,
        reported=2,
        accepted=("m1", "m2"),
        accepted_devices=("a", "b"),
        rejected={"stale": 1},
        num_examples=10,
        metrics={"train_loss": 0.3},
        refused={"bad_signature": 2},
    ),
    RoundAbandoned(
        experiment_id="e",
        round=1,
        reason="too few",
        reported=1,
        accepted=0,
        refused={"unsigned": 1},
    ),
    TaskGrant(
        experiment_id="e",
        round=3,
        device_id="d1",
        task_id="t",
        public_key="A" * 43 + "=",
        max_examples=500,
    ),
    RoundProgress(experiment_id="e", round=1, reported=("a", "b"), accepted=("a",)),
    PartialReady(experiment_id="e", round=1, sequence=3),
    WorkerAlive(group="fedmq-aggregators"),
    CombineRound(
        experiment_id="e",
        round=1,
        base_version=0,
        model=REF,
        min_reports=2,
        strategy=StrategySpec("fedadam", {"eta": 0.01}),
    ),
]


def test_every_message_kind_has_a_sample() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_messages_round_trip_exactly(message: Message) -> None:
    assert decode(encode(message)) == message


def test_inline_weights_travel_as_raw_payload_not_json() -> None:
    blob = bytes(range(256)) * 100
    update = ModelUpdate(
        experiment_id="e",
        round=1,
        device_id="d",
        base_version=0,
        task_id="t",
        num_examples=1,
        inline_weights=blob,
    )

    frame = encode(update)

    assert frame.endswith(blob)
    assert len(frame) < len(blob) + 1000


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"FMQ",
        b"XYZ\x01\x00\x00\x00\x02{}",
        b"FMQ\x01\x00\x00\x00\xff{}",
        b"FMQ\x01\x00\x00\x00\x02[]",
    ],
)
def test_garbage_frames_raise_codec_error(frame: bytes) -> None:
    with pytest.raises(CodecError):
        decode(frame)


def test_a_newer_schema_is_refused_with_its_own_error() -> None:
    header = json.dumps(
        {"schema_version": 99, "kind": "close_round", "body": {"experiment_id": "e", "round": 1}}
    ).encode()
    frame = struct.pack(">3sBI", b"FMQ", 1, len(header)) + header

    with pytest.raises(SchemaVersionError):
        decode(frame)


def test_body_with_wrong_fields_is_a_codec_error() -> None:
    header = json.dumps(
        {"schema_version": 1, "kind": "close_round", "body": {"experiment": "e"}}
    ).encode()
    with pytest.raises(CodecError):
        decode(struct.pack(">3sBI", b"FMQ", 1, len(header)) + header)


def _weights() -> dict[str, np.ndarray]:
    return {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}


def test_weights_round_trip_keeps_order_values_and_dtypes() -> None:
    weights = _weights()

    back = decode_weights(encode_weights(weights), weights_spec(weights))

    assert list(back) == ["w", "b"]
    for name in weights:
        np.testing.assert_array_equal(back[name], weights[name])
        assert back[name].dtype == np.float32


@pytest.mark.parametrize(
    ("mutate", "what"),
    [
        (lambda w: {**w, "extra": np.zeros(1, np.float32)}, "names"),
        (lambda w: {"w": w["w"]}, "names"),
        (lambda w: {**w, "b": np.ones(4, np.float32)}, "shape"),
        (lambda w: {**w, "b": np.ones(3, np.float64)}, "dtype"),
    ],
)
def test_weights_that_do_not_match_the_spec_are_refused(mutate: object, what: str) -> None:
    spec = weights_spec(_weights())
    bad = mutate(_weights())  # type: ignore[operator]

    with pytest.raises(WeightsMismatch) as caught:
        decode_weights(encode_weights(bad), spec)

    assert caught.value.what == what


def test_non_safetensors_bytes_are_a_codec_error() -> None:
    with pytest.raises(CodecError):
        decode_weights(b"not safetensors at all")


def _blob(header: dict[str, object], data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    "blob",
    [
        b"\x01\x00",
        struct.pack("<Q", 10**9) + b"{}",
        _blob({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 4),
        _blob({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8),
        _blob({"w": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}, b"\x00" * 8),
        _blob({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\x00" * 8),
        _blob({"w": "nope"}),
        struct.pack("<Q", 2) + b"[]",
    ],
    ids=["short", "huge-header", "truncated", "size", "dtype", "offsets", "entry", "not-object"],
)
def test_malformed_safetensors_are_codec_errors(blob: bytes) -> None:
    with pytest.raises(CodecError):
        decode_weights(blob)


def test_decoded_weights_are_views_of_the_frame_unless_copied() -> None:
    weights = _weights()
    update = ModelUpdate(
        experiment_id="e",
        round=1,
        device_id="d",
        base_version=0,
        task_id="t",
        num_examples=1,
        inline_weights=encode_weights(weights),
    )
    received = decode(encode(update))
    assert isinstance(received, ModelUpdate) and received.inline_weights is not None

    view = decode_weights(received.inline_weights)
    owned = decode_weights(received.inline_weights, copy=True)

    assert not view["w"].flags.owndata and not view["w"].flags.writeable
    assert owned["w"].flags.writeable
    np.testing.assert_array_equal(view["w"], weights["w"])


def _frame(kind: str, body: object, **envelope: object) -> bytes:
    header = json.dumps({"schema_version": 1, "kind": kind, "body": body, **envelope}).encode()
    return struct.pack(">3sBI", b"FMQ", 1, len(header)) + header


@pytest.mark.parametrize(
    "frame",
    [
        _frame("close_round", {"experiment_id": "e", "round": "1"}),
        _frame("close_round", {"experiment_id": "e", "round": True}),
        _frame("close_round", {"experiment_id": 7, "round": 1}),
        _frame("close_round", {"experiment_id": "e", "round": 1}, message_id=["x"]),
        _frame("check_in", {"device_id": "d", "platform": "p", "capabilities": [1]}),
        _frame("close_round", "not an object"),
        _frame(
            "round_abandoned",
            {"experiment_id": "e", "round": 1, "reason": "r", "rejected": {"x": "many"}},
        ),
        _frame("close_round", {"experiment_id": "e", "round": 1}, payload_field="round"),
        b"FMQ\x01\x00\x00\x00\x2d" + b'{"schema_version":1,"kind":"x","body":NaN}'.ljust(45),
    ],
    ids=[
        "str-int",
        "bool-int",
        "int-str",
        "list-id",
        "list-map",
        "body",
        "map-values",
        "payload-field",
        "nan",
    ],
)
def test_fields_of_the_wrong_type_are_codec_errors(frame: bytes) -> None:
    with pytest.raises(CodecError):
        decode(frame)


def test_non_finite_metrics_are_refused_on_the_wire() -> None:
    header = json.dumps(
        {
            "schema_version": 1,
            "kind": "model_update",
            "body": {
                "experiment_id": "e",
                "round": 1,
                "device_id": "d",
                "base_version": 0,
                "task_id": "t",
                "num_examples": 1,
                "metrics": {"loss": 1e999},
            },
        }
    ).encode()  # json.dumps writes Infinity
    with pytest.raises(CodecError):
        decode(struct.pack(">3sBI", b"FMQ", 1, len(header)) + header)


# -- signed frames -----------------------------------------------------------------

SIGNER = Identity.generate("d1")
ALL_KINDS = tuple(MessageKind)


def _verifier(at: float, *, max_age_s: float | None = 600.0, signer: Identity = SIGNER) -> Verifier:
    """Return a verifier that pins ``signer``'s key and whose clock reads ``at``."""
    keys = {signer.name: signer.public_key}
    return Verifier(keys.get, kinds=ALL_KINDS, max_age_s=max_age_s, clock=lambda: at)


def _refusal(verifier: Verifier, frame: bytes) -> str:
    with pytest.raises(Refused) as caught:
        verifier.open(frame)
    return caught.value.reason


def _split_signed(frame: bytes) -> tuple[dict[str, object], bytes]:
    """Split a signed frame by byte offsets: header, then 64 signature bytes, then payload."""
    (length,) = struct.unpack(">I", frame[4:8])
    header = json.loads(frame[8 : 8 + length])
    payload = frame[8 + length + SIGNATURE_BYTES :]
    assert header["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    return header, payload


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_signed_frames_round_trip_and_verify(message: Message) -> None:
    frame = encode(message, SIGNER)
    header, _ = _split_signed(frame)

    assert frame[3] == SIGNED_FRAME_VERSION
    assert header["sender"] == "d1"  # the signer, whatever the message said
    expected = dataclasses.replace(message, sender="d1")
    assert decode(frame) == expected
    assert _verifier(message.sent_at).open(frame) == expected


UPDATE = ModelUpdate(
    experiment_id="e",
    round=3,
    device_id="d1",
    base_version=2,
    task_id="t",
    num_examples=7,
    inline_weights=bytes(range(40)),
    metrics={"loss": 0.5},
    grant="c2lnbmVk",
)


def _regions(frame: bytes) -> dict[str, range]:
    (length,) = struct.unpack(">I", frame[4:8])
    header_end = 8 + length
    return {
        "prefix": range(0, 8),
        "header": range(8, header_end),
        "signature": range(header_end, header_end + SIGNATURE_BYTES),
        "payload": range(header_end + SIGNATURE_BYTES, len(frame)),
    }


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF])
def test_flipping_any_byte_of_a_signed_frame_is_refused_for_the_right_reason(mask: int) -> None:
    frame = encode(UPDATE, SIGNER)
    verifier = _verifier(UPDATE.sent_at)
    public = PublicKeys()
    regions = _regions(frame)
    assert all(len(r) > 0 for r in regions.values())
    reasons: dict[str, set[str]] = {name: set() for name in regions}

    for name, positions in regions.items():
        for i in positions:
            forged = bytearray(frame)
            forged[i] ^= mask
            reason = _refusal(verifier, bytes(forged))
            reasons[name].add(reason)
            try:
                parsed = parse_frame(bytes(forged))
            except CodecError:
                # Only a damaged prefix or header can stop the frame from parsing.
                assert name in ("prefix", "header") and reason == Refusal.MALFORMED.value
                continue
            if parsed.signature is None:  # the version byte now says "unsigned"
                assert name == "prefix" and reason == Refusal.UNSIGNED.value
                continue
            # Whatever the header now says, the pinned key's check fails on it.
            with pytest.raises(Refused) as caught:
                check_signature(parsed, SIGNER.public_key, public)
            want = Refusal.PAYLOAD_MISMATCH if name == "payload" else Refusal.BAD_SIGNATURE
            assert caught.value.reason == want.value, (name, i)

    assert reasons["signature"] == {Refusal.BAD_SIGNATURE.value}
    assert reasons["payload"] == {Refusal.PAYLOAD_MISMATCH.value}
    # A header that still parses names no other sender and kind the verifier takes,
    # or fails its signature; one that does not parse is malformed.
    assert reasons["header"] <= {
        Refusal.MALFORMED.value,
        Refusal.BAD_SIGNATURE.value,
        Refusal.UNKNOWN_SENDER.value,
        Refusal.NOT_PERMITTED.value,
    }
    if mask < 0x80:  # still ASCII, so some flips leave the JSON valid (0x80 and up never do)
        assert Refusal.BAD_SIGNATURE.value in reasons["header"]
    assert reasons["prefix"] <= {Refusal.MALFORMED.value, Refusal.UNSIGNED.value}


def test_a_truncated_or_extended_signed_frame_is_refused() -> None:
    frame = encode(UPDATE, SIGNER)
    verifier = _verifier(UPDATE.sent_at)

    assert _refusal(verifier, frame + b"\x00") == Refusal.PAYLOAD_MISMATCH.value
    assert _refusal(verifier, frame[:-1]) == Refusal.PAYLOAD_MISMATCH.value
    end = _regions(frame)["signature"]
    assert _refusal(verifier, frame[: end.stop - 1]) == Refusal.MALFORMED.value


def test_a_frame_signed_by_another_key_is_refused_as_a_bad_signature() -> None:
    impostor = Identity.generate("d1")  # same name, not the pinned key

    assert _refusal(_verifier(UPDATE.sent_at), encode(UPDATE, impostor)) == "bad_signature"


def test_a_frame_from_a_sender_with_no_pinned_key_is_refused() -> None:
    stranger = Identity.generate("d2")

    assert _refusal(_verifier(UPDATE.sent_at), encode(UPDATE, stranger)) == "unknown_sender"


def test_a_kind_the_receiver_does_not_take_is_refused() -> None:
    keys = {SIGNER.name: SIGNER.public_key}
    verifier = Verifier(keys.get, kinds=(MessageKind.CHECK_IN,), clock=lambda: UPDATE.sent_at)

    assert _refusal(verifier, encode(UPDATE, SIGNER)) == "not_permitted"


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_an_unsigned_frame_is_refused_as_unsigned(message: Message) -> None:
    assert _refusal(_verifier(message.sent_at), encode(message)) == Refusal.UNSIGNED.value


def test_a_frame_from_the_future_or_too_old_is_refused() -> None:
    now = 1_700_000_000.0
    at = {
        "future": dataclasses.replace(UPDATE, sent_at=now + 121.0),
        "skewed": dataclasses.replace(UPDATE, sent_at=now + 119.0),
        "old": dataclasses.replace(UPDATE, sent_at=now - 601.0),
        "recent": dataclasses.replace(UPDATE, sent_at=now - 599.0),
    }
    frames = {name: encode(message, SIGNER) for name, message in at.items()}
    verifier = _verifier(now)

    assert _refusal(verifier, frames["future"]) == Refusal.FROM_THE_FUTURE.value
    assert _refusal(verifier, frames["old"]) == Refusal.STALE.value
    assert verifier.open(frames["skewed"]).sent_at == now + 119.0  # within the clock skew
    assert verifier.open(frames["recent"]).sent_at == now - 599.0
    # Durable queues bound age by the round instead: no age limit, still no future.
    unbounded = _verifier(now, max_age_s=None)
    assert unbounded.open(frames["old"]).sent_at == now - 601.0
    assert _refusal(unbounded, frames["future"]) == Refusal.FROM_THE_FUTURE.value


def _raw_frame(header: bytes, version: int = 1, length: int | None = None) -> bytes:
    size = len(header) if length is None else length
    return struct.pack(">3sBI", b"FMQ", version, size) + header


@pytest.mark.parametrize("version", [1, SIGNED_FRAME_VERSION])
def test_an_oversized_header_is_a_codec_error(version: int) -> None:
    body = json.dumps({"pad": "x" * MAX_HEADER_BYTES}).encode()
    assert len(body) > MAX_HEADER_BYTES
    frames = [
        _raw_frame(body, version) + b"\x00" * SIGNATURE_BYTES,  # really that long
        _raw_frame(b"{}", version, length=MAX_HEADER_BYTES + 1),  # only claims to be
        _raw_frame(b"{}", version, length=0xFFFFFFFF),
    ]

    for frame in frames:
        with pytest.raises(CodecError, match="exceeds"):
            decode(frame)
        assert _refusal(_verifier(0.0), frame) == Refusal.MALFORMED.value


@pytest.mark.parametrize("version", [1, SIGNED_FRAME_VERSION])
@pytest.mark.parametrize("where", ["header", "body"])
def test_json_nested_100000_deep_is_a_codec_error_not_a_recursion_error(
    version: int, where: str
) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    text = deep if where == "header" else '{"kind":"close_round","body":' + deep + "}"
    frame = _raw_frame(text.encode(), version) + b"\x00" * SIGNATURE_BYTES

    with pytest.raises(CodecError):
        decode(frame)
    assert _refusal(_verifier(0.0), frame) == Refusal.MALFORMED.value
