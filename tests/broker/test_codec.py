from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from broker import (
    CheckIn,
    CheckOut,
    CloseRound,
    CodecError,
    ComeBackLater,
    ErrorReply,
    Message,
    ModelRef,
    ModelUpdate,
    RejectReason,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    SchemaVersionError,
    TrainTask,
    UpdateRejected,
    WeightsMismatch,
    decode,
    decode_weights,
    encode,
    encode_weights,
    weights_spec,
)
from broker.messages import MESSAGE_TYPES

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
        reply_to="fedmq/updates/e",
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
    ErrorReply(in_reply_to="t", code="checksum_mismatch", detail="x"),
    RoundOpened(
        experiment_id="e",
        round=1,
        base_version=0,
        model=REF,
        selected=("a", "b"),
        target_reports=2,
        min_reports=1,
        deadline_at=5.0,
        strategy={"name": "fedavg"},
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
    ),
    RoundAbandoned(experiment_id="e", round=1, reason="too few", reported=1, accepted=0),
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
