"""The mobile protocol's JSON Schemas describe exactly what the Python messages put on the wire.

Frames are split here byte by byte, as a Kotlin or Swift client would, and
their headers validated against ``broker/schema/``; the schemas' enums, fields
and defaults are compared with ``broker.messages`` so that neither side can
change alone; and the worked examples of ``docs/mobile-protocol.md`` are
checked against the codec.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import hashlib
import json
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_type_hints

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from aggregator_service.links import SignedLinks
from broker import (
    SCHEMA_VERSION,
    BrokerError,
    CheckIn,
    CheckOut,
    CodecError,
    ComeBackLater,
    Delivery,
    ErrorReply,
    MemoryTransport,
    Message,
    MessageKind,
    ModelRef,
    ModelUpdate,
    RejectReason,
    TrainTask,
    UpdateRejected,
    decode,
    decode_weights,
    encode,
    encode_weights,
    topics,
)
from broker.codec import ALL_MESSAGE_TYPES
from broker.errors import AccessError, IdentityError, Refused
from broker.identity import SIGNATURE_BYTES, Identity
from broker.messages import SecAggSettings, TaskGrant
from broker.schemas import (
    DEVICE_KINDS,
    SERVICE_KINDS,
    load_schema,
    schema_names,
    split_frame,
    validate_frame,
    validate_header,
)
from broker.secagg import (
    PRIME,
    SHARE_BYTES,
    AgreementKey,
    agree,
    expand,
    quantize,
    scale_for,
    seal,
    split,
)
from broker.secagg.keys import INFO_PREFIX, NONCE_BYTES, TAG_BYTES
from broker.secagg.messages import (
    SecAggDelivery,
    SecAggKeys,
    SecAggNeighbours,
    SecAggPeer,
    SecAggReveal,
    SecAggShares,
    SecAggUnmask,
)
from broker.secagg.protocol import b64, cipher_context, mask_context, share_aad
from broker.verify import Verifier
from device_sdk import ArtifactFetcher, DeviceApp, DeviceClient, DeviceContext, TrainResult
from device_sdk.errors import DeviceError
from tests.identities import SERVICE, TOPICS, device, grant

WORKER = Identity.generate("worker")

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "broker" / "schema"
DOC = ROOT / "docs" / "mobile-protocol.md"
ENVELOPE_FIELDS = ("message_id", "sender", "sent_at", "reply_to")

EXPERIMENT = "digits-fedavg-1a2b3c4d"
DEVICE = "android-5f0c2e9a7b1d"
TASK_ID = "0c9d3f7be2a44c1f9e6a5b4c3d2e1f00"
NOW = 1_700_000_000.0
LINKS = SignedLinks(b"k" * 32, "https://fedmq.example.org", clock=lambda: NOW)


def _weights(shift: float = 0.0) -> dict[str, np.ndarray]:
    """Return a small MLP's named float32 tensors."""
    rng = np.random.default_rng(0)
    return {
        "layers.0.weight": (rng.standard_normal((16, 64)) + shift).astype(np.float32),
        "layers.0.bias": np.full(16, shift, np.float32),
        "layers.2.weight": (rng.standard_normal((10, 16)) + shift).astype(np.float32),
        "layers.2.bias": np.full(10, shift, np.float32),
    }


GLOBAL = encode_weights(_weights())
GLOBAL_SHA = hashlib.sha256(GLOBAL).hexdigest()


def _signed_ref(data: bytes, fmt: str) -> ModelRef:
    sha = hashlib.sha256(data).hexdigest()
    return ModelRef(LINKS.download(sha), sha, len(data), fmt)


def _s3_ref(data: bytes, fmt: str) -> ModelRef:
    """Return a reference shaped like an S3 presigned GET (SigV4 query string)."""
    sha = hashlib.sha256(data).hexdigest()
    query = (
        "X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIAEXAMPLE%2F20231114%2Fus-east-1%2Fs3%2Faws4_request"
        "&X-Amz-Date=20231114T221320Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host"
        f"&X-Amz-Signature={'5e' * 32}"
    )
    url = f"https://fedmq-models.s3.us-east-1.amazonaws.com/fedmq/blobs/{sha}?{query}"
    return ModelRef(url, sha, len(data), fmt)


def _task(**overrides: Any) -> TrainTask:
    """Return a task shaped like the ones RoundService sends."""
    fields: dict[str, Any] = {
        "experiment_id": EXPERIMENT,
        "round": 4,
        "base_version": 3,
        "model": _signed_ref(GLOBAL, "safetensors"),
        "artifacts": {
            "model.onnx": _signed_ref(b"onnx graph", "onnx"),
            "android/training_model.onnx": _s3_ref(b"ort training graph", "binary"),
            "android/checkpoint": _s3_ref(b"ort checkpoint", "binary"),
        },
        "training": {
            "epochs": 1,
            "batch_size": 32,
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "proximal_mu": 0.01,
        },
        "deadline_at": NOW + 60.0,
        "upload_url": LINKS.upload(f"{EXPERIMENT}-4-{DEVICE}"),
        "max_inline_bytes": 1 << 20,
        "reply_to": TOPICS.updates(EXPERIMENT, DEVICE),
        "sender": "coordinator",
        "message_id": TASK_ID,
        "grant": grant(EXPERIMENT, 4, DEVICE, TASK_ID, max_examples=500),
        "aggregator_keys": {WORKER.name: WORKER.public_key_text},
    }
    return TrainTask(**{**fields, **overrides})


def _update(**overrides: Any) -> ModelUpdate:
    fields: dict[str, Any] = {
        "experiment_id": EXPERIMENT,
        "round": 4,
        "device_id": DEVICE,
        "base_version": 3,
        "task_id": TASK_ID,
        "num_examples": 172,
        "inline_weights": encode_weights(_weights(0.5)),
        "metrics": {"loss": 0.41, "loss_before": 0.93, "local_steps": 6.0},
        "sender": DEVICE,
        "grant": grant(EXPERIMENT, 4, DEVICE, TASK_ID, max_examples=500),
    }
    return ModelUpdate(**{**fields, **overrides})


def _uploaded_update() -> ModelUpdate:
    data = encode_weights(_weights(0.25))
    url = LINKS.upload(f"{EXPERIMENT}-4-{DEVICE}").split("?", 1)[0]
    ref = ModelRef(url, hashlib.sha256(data).hexdigest(), len(data))
    return _update(inline_weights=None, weights=ref)


CHECK_IN = CheckIn(
    device_id=DEVICE,
    platform="android",
    experiment_id=EXPERIMENT,
    capabilities={"ram_mb": 3072, "charging": True, "network": "wifi"},
    sender=DEVICE,
)
COME_BACK = ComeBackLater(
    experiment_id=EXPERIMENT,
    retry_after_s=57.5,
    reason="not selected this round",
    sender="coordinator",
)
REJECTED = [
    UpdateRejected(
        experiment_id=EXPERIMENT,
        round=4,
        update_id="7f1e2d3c4b5a69788796a5b4c3d2e1f0",
        reason=reason,
        detail=f"{reason.value} for the test",
        sender="worker",
    )
    for reason in RejectReason
]
ERROR = ErrorReply(
    in_reply_to=TASK_ID,
    code="checksum_mismatch",
    detail="https://fedmq.example.org/api/v1/blobs/...: sha256 1f2e... != expected 9a8b...",
    sender=DEVICE,
    grant=grant(EXPERIMENT, 4, DEVICE, TASK_ID, max_examples=500),
)
GRANT = TaskGrant(
    experiment_id=EXPERIMENT,
    round=4,
    device_id=DEVICE,
    task_id=TASK_ID,
    public_key=device(DEVICE).public_key_text,
    max_examples=500,
    sender="coordinator",
)


# -- a secure round of three neighbours, built with the primitives a phone would use ------

NEIGHBOURHOOD = (DEVICE, "android-0a1b2c3d4e5f", "ios-9f8e7d6c5b4a")
THRESHOLD = 2
SETTINGS = SecAggSettings(clip=1.0, scale=scale_for(1.0, 500 * 10), max_examples=500)


def _x25519(device_id: str, use: str) -> AgreementKey:
    """Return a device's round key (``cipher`` or ``mask``), fixed for the test."""
    return AgreementKey.from_private_bytes(hashlib.sha256(f"{device_id}/{use}".encode()).digest())


PEERS = {  # x-coordinates as the coordinator numbers U1: 1.. in sorted order
    v: SecAggPeer(
        i + 1, b64(_x25519(v, "cipher").public_bytes()), b64(_x25519(v, "mask").public_bytes())
    )
    for i, v in enumerate(sorted(NEIGHBOURHOOD))
}


def _shares_of(owner: str) -> dict[str, tuple[bytes, bytes]]:
    """Return ``owner``'s Shamir shares of its self-mask seed and its mask key, by recipient."""
    xs = {v: PEERS[v].index for v in NEIGHBOURHOOD}
    seed = hashlib.sha256(f"{owner}/seed".encode()).digest()
    seed_shares = split(seed, list(xs.values()), THRESHOLD)
    key_shares = split(_x25519(owner, "mask").private_bytes(), list(xs.values()), THRESHOLD)
    return {v: (seed_shares[x], key_shares[x]) for v, x in xs.items()}


PLAIN = {u: _shares_of(u) for u in NEIGHBOURHOOD}


def _sealed(sender: str, recipient: str) -> str:
    """Return the share pair ``sender`` encrypts for ``recipient``, as it travels."""
    peer_key = base64.b64decode(PEERS[recipient].cipher_key)
    key = agree(_x25519(sender, "cipher"), peer_key, context=cipher_context(EXPERIMENT, 4))
    seed_share, key_share = PLAIN[sender][recipient]
    aad = share_aad(EXPERIMENT, 4, sender, recipient)
    return b64(seal(key, seed_share + key_share, aad=aad))


SECURE_TASK = _task(secure_aggregation=SETTINGS)
KEYS = SecAggKeys(
    experiment_id=EXPERIMENT,
    round=4,
    device_id=DEVICE,
    task_id=TASK_ID,
    cipher_key=PEERS[DEVICE].cipher_key,
    mask_key=PEERS[DEVICE].mask_key,
    sender=DEVICE,
)
NEIGHBOURS = SecAggNeighbours(
    experiment_id=EXPERIMENT, round=4, threshold=THRESHOLD, peers=PEERS, sender="coordinator"
)
SHARES = SecAggShares(
    experiment_id=EXPERIMENT,
    round=4,
    device_id=DEVICE,
    shares={v: _sealed(DEVICE, v) for v in NEIGHBOURHOOD},
    sender=DEVICE,
)
DELIVERY = SecAggDelivery(
    experiment_id=EXPERIMENT,
    round=4,
    shares={v: _sealed(v, DEVICE) for v in NEIGHBOURHOOD},
    sender="coordinator",
)
UNMASK = SecAggUnmask(  # the last neighbour's masked update is not in the sum
    experiment_id=EXPERIMENT,
    round=4,
    survivors=NEIGHBOURHOOD[:2],
    dropped=NEIGHBOURHOOD[2:],
    sender="coordinator",
)
REVEAL = SecAggReveal(
    experiment_id=EXPERIMENT,
    round=4,
    device_id=DEVICE,
    seed_shares={v: b64(PLAIN[v][DEVICE][0]) for v in UNMASK.survivors},
    key_shares={v: b64(PLAIN[v][DEVICE][1]) for v in UNMASK.dropped},
    sender=DEVICE,
)
SAMPLES: list[Message] = [
    CHECK_IN,
    CheckIn(device_id=DEVICE, platform="ios", sender=DEVICE),
    CheckOut(device_id=DEVICE, reason="stopped", sender=DEVICE),
    CheckOut(device_id=DEVICE, reason="connection lost"),  # the last will: no sender
    _task(),
    _task(upload_url=None, max_inline_bytes=0, artifacts={}, training={"scaffold": True}),
    COME_BACK,
    _update(),
    _uploaded_update(),
    *REJECTED,
    ERROR,
    GRANT,
    SECURE_TASK,
    KEYS,
    NEIGHBOURS,
    SHARES,
    DELIVERY,
    UNMASK,
    REVEAL,
]


def signer_of(message: Message) -> Identity:
    """Return who signs ``message``: the service, a worker, or the device."""
    if message.sender == "coordinator":
        return SERVICE
    if message.sender == WORKER.name:
        return WORKER
    return device(DEVICE)


def signed(message: Message) -> bytes:
    """Return ``message`` as the signed frame its sender publishes."""
    return encode(message, signer_of(message))


def split_as_a_phone_would(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """Read a signed frame with nothing but byte offsets, a JSON parser and SHA-256."""
    assert frame[0:3] == b"FMQ"
    assert frame[3] == 2  # frame version: signed
    (length,) = struct.unpack(">I", frame[4:8])  # big-endian u32
    header = json.loads(frame[8 : 8 + length].decode("utf-8"))
    payload = frame[8 + length + SIGNATURE_BYTES :]  # after the 64-byte signature
    assert len(frame) >= 8 + length + SIGNATURE_BYTES
    assert header["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    return header, payload


def read_safetensors_as_a_phone_would(data: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    """Return ``name -> (dtype, shape, raw little-endian bytes)`` of a safetensors blob."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length].decode("utf-8"))
    header.pop("__metadata__", None)
    base = 8 + length
    return {
        name: (
            info["dtype"],
            info["shape"],
            data[base + info["data_offsets"][0] : base + info["data_offsets"][1]],
        )
        for name, info in header.items()
    }


# -- every phone-facing message validates -----------------------------------------


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: m.KIND.value)
def test_every_phone_facing_message_validates_against_its_schema(message: Message) -> None:
    frame = signed(message)

    header, payload = split_as_a_phone_would(frame)
    validate_header(header)

    assert header["kind"] == message.KIND.value
    assert message.KIND in DEVICE_KINDS
    if isinstance(message, ModelUpdate) and message.inline_weights is not None:
        assert header["payload_field"] == "inline_weights"
        tensors = read_safetensors_as_a_phone_would(payload)
        assert set(tensors) == set(_weights())
        dtype, shape, raw = tensors["layers.0.bias"]
        assert (dtype, shape) == ("F32", [16])
        assert np.frombuffer(raw, "<f4").tolist() == [0.5] * 16
    else:
        assert payload == b""


def test_every_phone_facing_kind_has_a_sample() -> None:
    assert {m.KIND for m in SAMPLES} == DEVICE_KINDS


def test_split_frame_agrees_with_a_byte_level_reading() -> None:
    frame = signed(_update())

    header, payload = split_frame(frame)

    assert (header, bytes(payload)) == split_as_a_phone_would(frame)
    assert validate_frame(frame) == header


def test_what_a_real_device_client_sends_validates(tmp_path: Path) -> None:
    transport = MemoryTransport()
    frames: list[bytes] = []
    app = DeviceApp()

    @app.on_train
    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        weights = {k: v + 0.5 for k, v in ctx.weights.items()}
        return TrainResult(weights, 40, {"loss": 0.5, "loss_before": 0.9, "local_steps": 2.0})

    def capture(delivery: Delivery) -> None:
        frames.append(delivery.body)
        delivery.ack()

    transport.subscribe(TOPICS.checkin(DEVICE), capture)
    transport.subscribe(TOPICS.updates(EXPERIMENT, DEVICE), capture)
    (tmp_path / "w").write_bytes(GLOBAL)
    good = ModelRef((tmp_path / "w").as_uri(), GLOBAL_SHA, len(GLOBAL))
    corrupt = ModelRef(good.uri, "0" * 64, len(GLOBAL))
    client = DeviceClient(
        app,
        transport,
        device(DEVICE),
        ArtifactFetcher(),
        service_key=SERVICE.public_key,
        topics=TOPICS,
        platform="android",
        examples=40,
    )

    client.start()
    for i, ref in enumerate((good, corrupt)):  # rounds 4 and 5: a device answers a round once
        task_id = f"{TASK_ID[:-1]}{i}"
        task = _task(
            model=ref,
            round=4 + i,
            upload_url=None,
            message_id=task_id,
            grant=grant(EXPERIMENT, 4 + i, DEVICE, task_id),
            sent_at=time.time(),
        )
        transport.publish(TOPICS.device(DEVICE), signed(task))
    transport.join(timeout=10)
    client.stop()
    transport.join(timeout=10)
    transport.close()

    kinds = [validate_frame(frame)["kind"] for frame in frames]
    assert kinds == ["check_in", "model_update", "error_reply", "check_out"]
    for frame in frames:  # each as a phone would write it: signed, checked byte by byte
        header, _ = split_as_a_phone_would(frame)
        assert header["sender"] == DEVICE
    reply = decode(frames[2])
    assert isinstance(reply, ErrorReply) and reply.code == "checksum_mismatch"
    assert reply.grant  # the refused task's grant goes back with the refusal


# -- what the schemas refuse ----------------------------------------------------------


def _header(message: Message) -> dict[str, Any]:
    header, _ = split_as_a_phone_would(signed(message))
    return header


def _drop(*path: str) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        target = header
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


def _put(value: Any, *path: str) -> Callable[[dict[str, Any]], None]:
    def change(header: dict[str, Any]) -> None:
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


NEGATIVE: list[tuple[str, Message, Callable[[dict[str, Any]], None]]] = [
    ("no message_id", _task(), _drop("message_id")),
    ("empty message_id", _task(), _put("", "message_id")),
    ("no body", CHECK_IN, _drop("body")),
    ("task without model", _task(), _drop("body", "model")),
    ("update without task_id", _update(), _drop("body", "task_id")),
    ("short sha256", _task(), _put("ab" * 31, "body", "model", "sha256")),
    ("uppercase sha256", _task(), _put(GLOBAL_SHA.upper(), "body", "model", "sha256")),
    ("artifact without uri", _task(), _drop("body", "artifacts", "model.onnx", "uri")),
    ("relative uri", _task(), _put("blobs/abc", "body", "model", "uri")),
    ("unknown kind", _task(), _put("train", "kind")),
    ("body of another kind", _task(), _put("check_in", "kind")),
    ("newer schema", _task(), _put(SCHEMA_VERSION + 1, "schema_version")),
    ("unknown body field", _task(), _put(3, "body", "priority")),
    ("unknown header field", _task(), _put("x", "trace_id")),
    ("round as a string", _task(), _put("4", "body", "round")),
    ("training setting null", _task(), _put(None, "body", "training", "lr")),
    ("device id with a slash", CHECK_IN, _put("a/b", "body", "device_id")),
    ("device id with a wildcard", _update(), _put("#", "body", "device_id")),
    ("unknown reject reason", REJECTED[0], _put("too_slow", "body", "reason")),
    ("error code with spaces", ERROR, _put("Checksum Mismatch", "body", "code")),
    ("error reply without sender", ERROR, _put("", "sender")),
    ("payload on a check_in", CHECK_IN, _put("capabilities", "payload_field")),
    ("update with no weights at all", _update(), _put(None, "payload_field")),
    (
        "update inline and by reference",
        _update(),
        _put(_header(_uploaded_update())["body"]["weights"], "body", "weights"),
    ),
    ("metric as a string", _update(), _put("0.4", "body", "metrics", "loss")),
    ("zero examples", _update(), _put(0, "body", "num_examples")),
    ("negative retry", COME_BACK, _put(-1, "body", "retry_after_s")),
    ("no payload digest", CHECK_IN, _drop("payload_sha256")),
    ("uppercase payload digest", _update(), _put("E3B0" * 16, "payload_sha256")),
    ("task with an empty grant", _task(), _put("", "body", "grant")),
    ("grant not base64", _update(), _put("not base64!", "body", "grant")),
    ("aggregator key too short", _task(), _put({"worker": "AAAA"}, "body", "aggregator_keys")),
    ("grant for no examples", GRANT, _put(-1, "body", "max_examples")),
    ("secure settings of another type", SECURE_TASK, _put(1.0, "body", "secure_aggregation")),
    ("zero clip", SECURE_TASK, _put(0, "body", "secure_aggregation", "clip")),
    ("unknown secure setting", SECURE_TASK, _put(1, "body", "secure_aggregation", "noise")),
    ("X25519 key of 31 bytes", KEYS, _put(b64(bytes(31)), "body", "cipher_key")),
    ("keys without task_id", KEYS, _drop("body", "task_id")),
    ("threshold of 1", NEIGHBOURS, _put(1, "body", "threshold")),
    ("peer at x = 0", NEIGHBOURS, _put(0, "body", "peers", DEVICE, "index")),
    ("peer without mask key", NEIGHBOURS, _drop("body", "peers", DEVICE, "mask_key")),
    ("shares for a device id with a slash", SHARES, _put({"a/b": "AAAA"}, "body", "shares")),
    ("delivered share not a string", DELIVERY, _put(7, "body", "shares", DEVICE)),
    ("survivors as one string", UNMASK, _put(DEVICE, "body", "survivors")),
    ("reveal without device_id", REVEAL, _drop("body", "device_id")),
]


@pytest.mark.parametrize(("case", "message", "change"), NEGATIVE, ids=[n[0] for n in NEGATIVE])
def test_the_schemas_refuse_malformed_headers(
    case: str, message: Message, change: Callable[[dict[str, Any]], None]
) -> None:
    header = _header(message)
    validate_header(copy.deepcopy(header))  # valid before the change
    change(header)

    with pytest.raises(CodecError, match=r"header breaks \w+\.json"):
        validate_header(header)


def test_secure_settings_without_their_scale_break_the_task_schema() -> None:
    header = _header(SECURE_TASK)
    validate_header(copy.deepcopy(header))
    del header["body"]["secure_aggregation"]["scale"]

    with pytest.raises(CodecError, match=r"train_task\.json at body/secure_aggregation"):
        validate_header(header)
    raw = json.dumps(header).encode()
    with pytest.raises(CodecError, match="scale"):  # and the codec cannot build the settings
        decode(struct.pack(">3sBI", b"FMQ", 1, len(raw)) + raw)


def test_split_frame_refuses_what_is_not_a_frame() -> None:
    frame, unsigned = signed(CHECK_IN), encode(CHECK_IN)

    def framed(raw: bytes) -> bytes:
        return struct.pack(">3sBI", b"FMQ", 1, len(raw)) + raw

    nan, array = framed(b'{"kind":"check_in","sent_at":NaN}'), framed(b"[1, 2]")
    for bad in (
        b"FMQ",
        b"XYZ" + frame[3:],
        frame[:3] + b"\x03" + frame[4:],
        unsigned[:3] + b"\x02" + unsigned[4:],  # says signed, has no signature
        frame[: len(frame) - 1],  # cut inside the signature
        frame[:20],
        nan,
        array,
    ):
        with pytest.raises(CodecError):
            split_frame(bad)


# -- the schemas and the Python messages change together ---------------------------


def _body(kind: MessageKind) -> dict[str, Any]:
    body: dict[str, Any] = load_schema(kind)["$defs"]["body"]
    return body


def _payload_fields(cls: type[Message]) -> set[str]:
    hints = get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if "bytes" in str(hints[f.name])}


def _json_default(f: dataclasses.Field[Any]) -> Any:
    """Return a field's default as JSON writes it (a tuple is an array)."""
    if f.default is not dataclasses.MISSING:
        value = f.default
    else:
        assert f.default_factory is not dataclasses.MISSING
        value = f.default_factory()
    return json.loads(json.dumps(value))


def test_every_message_kind_is_listed_and_classified() -> None:
    envelope = load_schema("envelope")

    assert envelope["properties"]["kind"]["enum"] == [kind.value for kind in MessageKind], (
        "MessageKind changed: envelope.json kind.enum must be "
        + json.dumps([kind.value for kind in MessageKind])
    )
    assert set(MessageKind) == DEVICE_KINDS | SERVICE_KINDS, "classify the new kind in schemas.py"
    assert not DEVICE_KINDS & SERVICE_KINDS


def test_reject_reasons_are_listed() -> None:
    reasons = [reason.value for reason in RejectReason]

    listed = _body(MessageKind.UPDATE_REJECTED)["properties"]["reason"]["enum"]

    assert listed == reasons, f"update_rejected.json reason.enum must be {json.dumps(reasons)}"


@pytest.mark.parametrize("kind", sorted(DEVICE_KINDS, key=lambda k: k.value), ids=str)
def test_each_body_schema_describes_exactly_the_message_fields(kind: MessageKind) -> None:
    cls = ALL_MESSAGE_TYPES[kind]
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ENVELOPE_FIELDS}
    body = _body(kind)
    schema = load_schema(kind)

    assert schema["properties"]["kind"] == {"const": kind.value}
    assert set(body["properties"]) == set(fields), f"{kind.value}.json and {cls.__name__} differ"
    assert set(body["required"]) == set(fields) - _payload_fields(cls)
    assert body["additionalProperties"] is False
    for name, f in fields.items():
        described = body["properties"][name]
        assert described.get("description"), f"{kind.value}.{name} needs a description"
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert "default" not in described, f"{kind.value}.{name} has no default in Python"
        else:
            assert described.get("default", "missing") == _json_default(f), name


def test_the_model_ref_schema_describes_exactly_model_ref() -> None:
    schema = load_schema("model_ref")
    fields = {f.name: f for f in dataclasses.fields(ModelRef)}

    assert set(schema["properties"]) == set(schema["required"]) == set(fields)
    assert schema["properties"]["format"]["default"] == fields["format"].default
    assert schema["additionalProperties"] is False


def test_the_envelope_lists_exactly_what_the_codec_writes() -> None:
    envelope = load_schema("envelope")
    written = set(_header(CHECK_IN))

    assert set(envelope["properties"]) == set(envelope["required"]) == written
    assert set(ENVELOPE_FIELDS) <= written
    assert envelope["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    assert envelope["$defs"]["segment"]["pattern"] == topics._SEGMENT.pattern


def test_the_error_codes_are_those_the_python_device_can_send() -> None:
    def codes(root: type) -> set[str]:
        found = {str(root.__dict__["code"])} if "code" in root.__dict__ else set()
        for sub in root.__subclasses__():
            found |= codes(sub)
        return found

    # DeviceClient also writes training_failed for an exception of the trainer itself.
    # Verification, identity and broker-access errors arise outside a task's
    # serving (a refused frame is dropped, not answered), so no reply carries them.
    never_answered = codes(Refused) | codes(IdentityError) | codes(AccessError)
    sendable = (codes(BrokerError) - never_answered) | codes(DeviceError) | {"training_failed"}

    listed = _body(MessageKind.ERROR_REPLY)["properties"]["code"]["examples"]

    assert set(listed) == sendable
    pattern = re.compile(_body(MessageKind.ERROR_REPLY)["properties"]["code"]["pattern"])
    assert all(pattern.match(code) for code in sendable)


def test_the_schema_files_are_valid_and_named_consistently() -> None:
    on_disk = {p.stem for p in SCHEMA_DIR.glob("*.json")}

    assert on_disk == set(schema_names())
    ids = set()
    for name in schema_names():
        schema = load_schema(name)
        Draft202012Validator.check_schema(schema)
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"].endswith(f"/schema/{SCHEMA_VERSION}/{name}.json")
        ids.add(schema["$id"])
    assert len(ids) == len(schema_names())
    with pytest.raises(ValueError, match="no schema"):
        load_schema(MessageKind.ROUND_OPENED)


# -- the document's examples are what the code produces ------------------------------


def _hex_block(marker: str) -> bytes:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"<!-- {marker} -->")
    block = text[start:].split("```", 2)[1]
    rows = re.findall(r"^[0-9a-f]{8}: ((?:[0-9a-f]{2} ?)+)", block, flags=re.M)
    return bytes.fromhex("".join(rows))


def test_the_documented_frame_is_what_the_codec_writes() -> None:
    message = CheckIn(
        device_id="phone-7f3a",
        platform="android",
        experiment_id="digits-fedavg-1a2b3c4d",
        capabilities={"ram_mb": 2048},
        message_id="9b1c0f6e2d4a4e8f8a7b6c5d4e3f2a1b",
        sender="phone-7f3a",
        sent_at=1700000000.5,
    )

    # RFC 8032's published test key (section 7.1, TEST 1), as the document says.
    rfc8032 = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
    phone = Identity.from_private_bytes("phone-7f3a", rfc8032)
    documented = _hex_block("example: check_in frame")

    assert phone.public_key_text == "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
    assert documented == encode(message, phone)  # Ed25519 signatures are deterministic
    assert len(documented) == 451
    assert decode(documented) == message
    validate_frame(documented)
    verifier = Verifier(
        {"phone-7f3a": phone.public_key}.get,
        kinds=(MessageKind.CHECK_IN,),
        clock=lambda: message.sent_at,
    )
    assert verifier.open(documented) == message


def test_the_documented_secure_aggregation_values_are_the_codes() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## 11. Secure aggregation") :]
    block = section[section.index("<!-- example: secure aggregation -->") :].split("```", 2)[1]
    own, peer, cipher, mask, pair_mask, seed, self_mask = re.findall(
        r"^.+? += (.+)$", block, flags=re.M
    )
    where = {"<experiment_id>": EXPERIMENT, "<round>": "4", "<sender>": "a", "<recipient>": "b"}

    def filled(template: str) -> bytes:
        for name, value in where.items():
            template = template.replace(name, value)
        return template.encode()

    key = AgreementKey.from_private_bytes(bytes.fromhex(own))
    pair_seed = agree(key, bytes.fromhex(peer), context=mask_context(EXPERIMENT, 4))
    assert agree(key, bytes.fromhex(peer), context=cipher_context(EXPERIMENT, 4)).hex() == cipher
    assert pair_seed.hex() == mask
    assert [f"{v:08x}" for v in expand(pair_seed, 4)] == pair_mask.split()
    assert [f"{v:08x}" for v in expand(bytes.fromhex(seed), 4)] == self_mask.split()
    values, clipped = quantize(np.array([-0.3, 2.0, 0.5, 0.25]), clip=1.0, weight=3, scale=4.0)
    assert (values.tolist(), clipped) == ([0xFFFFFFFC, 12, 6, 3], 1)
    # The strings and sizes the text gives are the code's.
    assert f"info `{INFO_PREFIX.decode()}`" in section
    for template, made in (
        ("cipher|<experiment_id>|<round>", cipher_context(EXPERIMENT, 4)),
        ("mask|<experiment_id>|<round>", mask_context(EXPERIMENT, 4)),
        ("share|<experiment_id>|<round>|<sender>|<recipient>", share_aad(EXPERIMENT, 4, "a", "b")),
    ):
        assert f"`{template}`" in section and filled(template) == made, template
    assert "p = 2^521 - 1" in section and PRIME == 2**521 - 1
    sealed = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
    layout = f"nonce ({NONCE_BYTES}) | ciphertext ({2 * SHARE_BYTES}) | tag ({TAG_BYTES}), {sealed}"
    assert layout in " ".join(section.split())


def test_the_documented_safetensors_blob_decodes() -> None:
    documented = _hex_block("example: safetensors")

    weights = decode_weights(documented)

    assert list(weights) == ["fc.bias"]
    assert weights["fc.bias"].dtype == np.float32
    assert weights["fc.bias"].tolist() == [0.5, -1.0]


def test_the_document_links_every_schema_and_names_the_topics() -> None:
    text = DOC.read_text(encoding="utf-8")

    for name in schema_names():
        assert f"../broker/schema/{name}.json" in text, name
    for topic in (
        TOPICS.checkin("DEVICE").replace("DEVICE", "<device_id>"),
        TOPICS.device("DEVICE").replace("DEVICE", "<device_id>"),
        TOPICS.updates("EXP", "DEVICE")
        .replace("EXP", "<experiment_id>")
        .replace("DEVICE", "<device_id>"),
    ):
        assert f"`{topic}`" in text, topic
