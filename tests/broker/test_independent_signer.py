"""A second implementation of the signed frame, written from docs/mobile-protocol.md only.

The writer and reader below use nothing but ``cryptography``'s Ed25519,
``json``, ``struct``, ``hashlib`` and ``base64``, as a Kotlin or Swift client
would: they import nothing from ``broker.codec``, ``broker.verify`` or
``broker.identity``. FedMQ's real receivers (the coordinator's check-in path,
the worker's update gate, a whole round) must accept what this writer
signs and refuse it with one byte flipped; this reader must verify what
FedMQ signs. The document's worked example is regenerated here from its
fixed key, and every frame FedMQ writes is validated against
``broker/schema/``.
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
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from aggregator_service import Database
from aggregator_service.gate import UpdateGate
from broker import (
    CheckIn,
    CheckOut,
    ComeBackLater,
    Delivery,
    ErrorReply,
    MemoryTransport,
    ModelRef,
    ModelUpdate,
    RejectReason,
    TrainTask,
    UpdateRejected,
    decode_weights,
    encode,
)
from broker.codec import split_frame
from broker.errors import Refused
from broker.identity import Identity
from broker.schemas import load_schema, schema_names
from broker.topics import Topics
from model_store import LocalStore
from tests.identities import SERVICE, WORKER, aggregator, device, grant, round_service

# ---------------------------------------------------------------------------------
# The independent implementation: the document's sections 3 and 5, nothing else.
# ---------------------------------------------------------------------------------
# -- BEGIN of the independent implementation

MAGIC = b"FMQ"
SIGNED_VERSION = 2
SIGNATURE_BYTES = 64
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
NAMESPACE = "fedmq"


def raw_public_key(key: Ed25519PrivateKey) -> bytes:
    """Return the 32 raw bytes of ``key``'s public half."""
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_text(raw: bytes) -> str:
    """Return a key as registration carries it: standard, padded base64."""
    return base64.b64encode(raw).decode("ascii")


def write_frame(
    key: Ed25519PrivateKey,
    header: dict[str, Any],
    payload: bytes = b"",
    *,
    separators: tuple[str, str] = (",", ":"),
) -> bytes:
    """Return a signed frame: prefix | header | signature over prefix and header | payload."""
    header = {**header, "payload_sha256": hashlib.sha256(payload).hexdigest()}
    raw = json.dumps(header, separators=separators).encode("utf-8")
    signed = MAGIC + bytes([SIGNED_VERSION]) + struct.pack(">I", len(raw)) + raw
    return signed + key.sign(signed) + payload


def envelope(
    kind: str,
    sender: str,
    body: dict[str, Any],
    *,
    message_id: str | None = None,
    sent_at: float | None = None,
    payload_field: str | None = None,
) -> dict[str, Any]:
    """Return a header without its digest, the keys in the order FedMQ writes them."""
    return {
        "schema_version": 1,
        "kind": kind,
        "message_id": message_id or hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:32],
        "sender": sender,
        "sent_at": time.time() if sent_at is None else sent_at,
        "reply_to": None,
        "body": body,
        "payload_field": payload_field,
    }


class NotBelieved(Exception):
    """The independent reader refuses a frame."""


@dataclass(frozen=True)
class Read:
    header: dict[str, Any]
    payload: bytes


def read_frame(frame: bytes, keys: dict[str, bytes]) -> Read:
    """Split a signed frame and verify it with the key pinned for its sender."""
    if frame[:3] != MAGIC or len(frame) < 8 or frame[3] != SIGNED_VERSION:
        raise NotBelieved("not a signed FedMQ frame")
    (length,) = struct.unpack(">I", frame[4:8])
    end = 8 + length
    if len(frame) < end + SIGNATURE_BYTES:
        raise NotBelieved("truncated")
    try:
        header = json.loads(frame[8:end].decode("utf-8"))
    except ValueError as exc:
        raise NotBelieved(f"bad header: {exc}") from exc
    if not isinstance(header, dict) or header.get("sender") not in keys:
        raise NotBelieved("unknown sender")
    signature, payload = frame[end : end + SIGNATURE_BYTES], frame[end + SIGNATURE_BYTES :]
    try:
        Ed25519PublicKey.from_public_bytes(keys[header["sender"]]).verify(signature, frame[:end])
    except InvalidSignature as exc:
        raise NotBelieved("bad signature") from exc
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise NotBelieved("payload mismatch")
    return Read(header, payload)


def read_grant(text: str, service_key: bytes) -> dict[str, Any]:
    """Return the body of a task grant the service signed."""
    read = read_frame(base64.b64decode(text, validate=True), {"coordinator": service_key})
    if read.header["kind"] != "task_grant":
        raise NotBelieved("not a task grant")
    body: dict[str, Any] = read.header["body"]
    return body


def write_safetensors(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """Return safetensors bytes: u64 LE header length | padded JSON header | data."""
    header: dict[str, Any] = {}
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def read_safetensors(blob: bytes) -> dict[str, tuple[str, list[int], bytes]]:
    """Return ``name -> (dtype, shape, raw bytes)`` of safetensors bytes."""
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length].decode("utf-8"))
    header.pop("__metadata__", None)
    base = 8 + length
    return {
        name: (
            info["dtype"],
            info["shape"],
            blob[base + info["data_offsets"][0] : base + info["data_offsets"][1]],
        )
        for name, info in header.items()
    }


def f32(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def check_in_header(
    device_id: str, experiment_id: str | None, examples: int, **envelope_fields: Any
) -> dict[str, Any]:
    body = {
        "device_id": device_id,
        "platform": "android",
        "experiment_id": experiment_id,
        "capabilities": {"tasks_in_progress": 0, "examples": examples},
    }
    return envelope("check_in", device_id, body, **envelope_fields)


def update_header(
    grant: dict[str, Any], grant_text: str, base_version: int, num_examples: int
) -> dict[str, Any]:
    body = {
        "experiment_id": grant["experiment_id"],
        "round": grant["round"],
        "device_id": grant["device_id"],
        "base_version": base_version,
        "task_id": grant["task_id"],
        "num_examples": num_examples,
        "weights": None,
        "metrics": {"loss": 0.5, "loss_before": 0.9, "local_steps": 3.0},
        "grant": grant_text,
    }
    return envelope("model_update", grant["device_id"], body, payload_field="inline_weights")


def flipped(frame: bytes, at: int) -> bytes:
    """Return ``frame`` with the byte at ``at`` (negative: from the end) changed."""
    changed = bytearray(frame)
    changed[at] ^= 0x01
    return bytes(changed)


def header_length(frame: bytes) -> int:
    (length,) = struct.unpack(">I", frame[4:8])
    return int(length)


def value_offset(frame: bytes, text: str) -> int:
    """Return where ``text`` starts inside the header of ``frame``."""
    at = frame.index(text.encode(), 8)
    assert at < 8 + header_length(frame)
    return at


# -- END of the independent implementation
# ---------------------------------------------------------------------------------
# FedMQ itself, used only as the receiver and as the writer the reader checks.
# ---------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "mobile-protocol.md"
TOPICS = Topics()


@dataclass
class FakeDelivery:
    topic: str
    body: bytes
    redelivered: bool = False
    settled: list[str] = field(default_factory=list)

    def ack(self) -> None:
        self.settled.append("ack")

    def nack(self, requeue: bool = False) -> None:
        self.settled.append("nack")


def private_key_of(identity: Identity) -> Ed25519PrivateKey:
    """Return a test identity's key as the independent writer holds it (raw 32 bytes)."""
    return Ed25519PrivateKey.from_private_bytes(identity.private_bytes())


def test_the_independent_implementation_uses_no_fedmq_code() -> None:
    source = Path(__file__).read_text(encoding="utf-8")
    part = source.split("# -- BEGIN of the independent")[1].split("# -- END of the independent")[0]

    assert "broker" not in part and "Identity" not in part and "tests." not in part


# -- the worked example ----------------------------------------------------------------

DOC_KEY = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
"""RFC 8032, section 7.1, TEST 1: a published key, for examples only."""
DOC_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


def doc_block(marker: str) -> bytes:
    """Return the bytes of the hex dump that follows ``<!-- marker -->`` in the document."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"<!-- {marker} -->")
    block = text[start:].split("```", 2)[1]
    rows = re.findall(r"^[0-9a-f]{8}: ((?:[0-9a-f]{2} ?)+)", block, flags=re.M)
    return bytes.fromhex("".join(rows))


def hex_dump(data: bytes) -> str:
    """Return ``data`` as the document prints it (16 bytes a row, offsets, ASCII)."""
    rows = []
    for at in range(0, len(data), 16):
        chunk = data[at : at + 16]
        ascii_ = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        rows.append(f"{at:08x}: {' '.join(f'{b:02x}' for b in chunk):<47}  {ascii_}")
    return "\n".join(rows)


def doc_example_frame() -> bytes:
    """Return the document's check_in example, written by the independent writer."""
    header = check_in_header(
        "phone-7f3a",
        "digits-fedavg-1a2b3c4d",
        0,
        message_id="9b1c0f6e2d4a4e8f8a7b6c5d4e3f2a1b",
        sent_at=1700000000.5,
    )
    header["body"]["capabilities"] = {"ram_mb": 2048}
    return write_frame(Ed25519PrivateKey.from_private_bytes(DOC_KEY), header)


def test_the_documented_signed_frame_is_what_both_writers_write() -> None:
    independent = doc_example_frame()
    fedmq = encode(
        CheckIn(
            device_id="phone-7f3a",
            platform="android",
            experiment_id="digits-fedavg-1a2b3c4d",
            capabilities={"ram_mb": 2048},
            message_id="9b1c0f6e2d4a4e8f8a7b6c5d4e3f2a1b",
            sent_at=1700000000.5,
        ),
        Identity.from_private_bytes("phone-7f3a", DOC_KEY),
    )

    documented = doc_block("example: check_in frame")

    assert raw_public_key(Ed25519PrivateKey.from_private_bytes(DOC_KEY)) == DOC_PUBLIC
    assert independent == fedmq, "the independent writer and broker.codec disagree"
    assert documented == independent, "regenerate the dump:\n" + hex_dump(independent)
    length = header_length(documented)
    signature = documented[8 + length :].hex()
    text = DOC.read_text(encoding="utf-8")
    for fact in (
        key_text(DOC_PUBLIC),
        DOC_KEY.hex(),
        f"is {len(documented)} bytes",
        f"0x{length:x} = {length} bytes",
        signature[:32],
        signature[32:64],
        signature[64:96],
        signature[96:],
        EMPTY_SHA256,
    ):
        assert fact in text, fact
    assert read_frame(documented, {"phone-7f3a": DOC_PUBLIC}).payload == b""


# -- FedMQ's receivers accept the independent writer -----------------------------------


@dataclass
class Bench:
    """A coordinator and a worker on one in-process bus, with a phone registered by key."""

    transport: MemoryTransport
    service: Any
    experiment_id: str
    device_id: str
    key: Ed25519PrivateKey
    service_key: bytes
    inbox: list[bytes]
    frames: list[tuple[str, bytes]]


@pytest.fixture
def bench(tmp_path: Path, small_config: Any) -> Iterator[Bench]:
    transport = MemoryTransport()
    store = LocalStore(tmp_path / "store")
    db = Database("sqlite://")
    service = round_service(transport, store, db)
    service.start()
    aggregator(transport, store).start()
    key = Ed25519PrivateKey.generate()
    registration = service.register_device(
        "android", public_key=key_text(raw_public_key(key)), device_id="phone-indep-1"
    )
    inbox: list[bytes] = []
    frames: list[tuple[str, bytes]] = []

    def to_phone(delivery: Delivery) -> None:
        inbox.append(delivery.body)
        delivery.ack()

    def everything(delivery: Delivery) -> None:
        frames.append((delivery.topic, delivery.body))
        delivery.ack()

    transport.subscribe(f"{NAMESPACE}/device/{registration.device_id}", to_phone)
    transport.subscribe(f"{NAMESPACE}/#", everything)
    config = small_config(rounds={"count": 1, "devices_per_round": 1, "min_reports": 1})
    experiment_id = service.create_experiment(config)
    service.request_rounds(experiment_id, 1)
    # The service key as POST /api/v1/devices returns it (service_key), pinned by the phone.
    service_key = base64.b64decode(key_text(service.public_key))
    yield Bench(
        transport, service, experiment_id, registration.device_id, key, service_key, inbox, frames
    )
    transport.close()
    db.close()


def _check_in(bench: Bench, frame: bytes) -> None:
    bench.transport.publish(f"{NAMESPACE}/checkin/{bench.device_id}", frame)
    bench.transport.join(timeout=30)


def test_the_coordinator_takes_an_independent_check_in_and_a_round_starts(bench: Bench) -> None:
    assert bench.service.experiment(bench.experiment_id).state == "waiting"

    _check_in(
        bench, write_frame(bench.key, check_in_header(bench.device_id, bench.experiment_id, 150))
    )

    assert bench.service.refusals.snapshot() == {}
    assert bench.service.experiment(bench.experiment_id).current_round == 1
    (task_frame,) = bench.inbox
    task = read_frame(task_frame, {"coordinator": bench.service_key}).header
    assert task["kind"] == "train_task" and task["sender"] == "coordinator"
    assert task["reply_to"] == f"{NAMESPACE}/updates/{bench.experiment_id}/{bench.device_id}"
    granted = read_grant(task["body"]["grant"], bench.service_key)
    assert granted == {
        "experiment_id": bench.experiment_id,
        "round": 1,
        "device_id": bench.device_id,
        "task_id": task["message_id"],
        "public_key": key_text(raw_public_key(bench.key)),
        "max_examples": 150,  # the examples capability the check-in declared
    }
    assert set(task["body"]["aggregator_keys"]) == {WORKER.name}


def test_a_whole_round_with_an_independent_phone_commits(bench: Bench) -> None:
    _check_in(
        bench, write_frame(bench.key, check_in_header(bench.device_id, bench.experiment_id, 150))
    )
    (task_frame,) = bench.inbox
    task = read_frame(task_frame, {"coordinator": bench.service_key}).header
    body = task["body"]
    with urllib.request.urlopen(body["model"]["uri"]) as answer:  # file:// in-process
        blob = answer.read()
    assert hashlib.sha256(blob).hexdigest() == body["model"]["sha256"]
    trained = {
        name: (dtype, shape, f32([0.25] * (len(raw) // 4)))
        for name, (dtype, shape, raw) in read_safetensors(blob).items()
    }
    payload = write_safetensors(trained)
    granted = read_grant(body["grant"], bench.service_key)
    header = update_header(granted, body["grant"], body["base_version"], 120)

    bench.transport.publish(task["reply_to"], write_frame(bench.key, header, payload))
    bench.transport.join(timeout=60)

    (record,) = bench.service.rounds(bench.experiment_id)
    assert record.state == "committed"
    assert record.accepted == (header["message_id"],)
    assert record.accepted_devices == (bench.device_id,)
    assert bench.service.refusal_counts() == {"coordinator": {}, WORKER.name: {}}
    _, weights = bench.service.model_weights(bench.experiment_id)
    assert all((w == 0.25).all() for w in decode_weights(weights).values())


def test_a_flipped_check_in_is_refused_and_starts_nothing(bench: Bench) -> None:
    good = write_frame(bench.key, check_in_header(bench.device_id, bench.experiment_id, 150))
    length = header_length(good)
    cases = {
        "a header byte": (value_offset(good, '"android"') + 1, "bad_signature"),
        "a signature byte": (8 + length + 10, "bad_signature"),
        "the version byte": (3, "malformed"),
    }
    for at, _ in cases.values():
        _check_in(bench, flipped(good, at))

    assert bench.service.refusals.snapshot() == {"bad_signature": 2, "malformed": 1}
    assert bench.service.experiment(bench.experiment_id).state == "waiting"
    assert bench.inbox == []
    stranger = Ed25519PrivateKey.generate()  # right name, another key
    _check_in(
        bench, write_frame(stranger, check_in_header(bench.device_id, bench.experiment_id, 1))
    )
    stale = check_in_header(bench.device_id, bench.experiment_id, 1, sent_at=time.time() - 601)
    _check_in(bench, write_frame(bench.key, stale))
    assert bench.service.refusals.snapshot() == {"bad_signature": 3, "malformed": 1, "stale": 1}
    assert bench.inbox == []


# -- the worker's gate ----------------------------------------------------------------

EXP = "digits-fedavg-1a2b3c4d"
PHONE = "android-indep-2"
TASK_ID = "0c9d3f7be2a44c1f9e6a5b4c3d2e1f00"
TENSORS = {
    "fc.bias": ("F32", [2], f32([0.5, -1.0])),
    "fc.weight": ("F32", [2, 2], f32([1, 2, 3, 4])),
}


def _gated_update(num_examples: int = 40, max_examples: int = 200) -> tuple[str, bytes]:
    """Return the topic and independent frame of an update under a service-issued grant."""
    text = grant(EXP, 4, PHONE, TASK_ID, max_examples=max_examples)
    granted = read_grant(text, SERVICE.public_key)
    header = update_header(granted, text, 3, num_examples)
    frame = write_frame(private_key_of(device(PHONE)), header, write_safetensors(TENSORS))
    return f"{NAMESPACE}/updates/{EXP}/{PHONE}", frame


def test_the_gate_admits_an_independent_update_with_inline_weights() -> None:
    gate = UpdateGate(SERVICE.public_key, TOPICS)
    topic, frame = _gated_update()

    admitted = gate.admit(FakeDelivery(topic, frame))

    update = admitted.message
    assert isinstance(update, ModelUpdate)
    assert (update.device_id, update.task_id, update.num_examples) == (PHONE, TASK_ID, 40)
    assert admitted.grant.max_examples == 200
    weights = decode_weights(update.inline_weights)
    assert weights["fc.bias"].tolist() == [0.5, -1.0]
    assert weights["fc.weight"].tolist() == [[1, 2], [3, 4]]


def test_the_gate_admits_an_independent_refusal_of_a_task() -> None:
    text = grant(EXP, 4, PHONE, TASK_ID)
    body = {"in_reply_to": TASK_ID, "code": "fetch_failed", "detail": "403", "grant": text}
    frame = write_frame(private_key_of(device(PHONE)), envelope("error_reply", PHONE, body))

    admitted = UpdateGate(SERVICE.public_key, TOPICS).admit(
        FakeDelivery(f"{NAMESPACE}/updates/{EXP}/{PHONE}", frame)
    )

    assert isinstance(admitted.message, ErrorReply) and admitted.message.code == "fetch_failed"


def test_independent_json_layout_is_accepted_as_sent() -> None:
    """The signature covers the bytes as sent: spacing and key order are the writer's."""
    text = grant(EXP, 4, PHONE, TASK_ID)
    granted = read_grant(text, SERVICE.public_key)
    header = update_header(granted, text, 3, 40)
    shuffled = dict(reversed(list(header.items())))
    shuffled["body"] = dict(reversed(list(header["body"].items())))
    frame = write_frame(
        private_key_of(device(PHONE)), shuffled, write_safetensors(TENSORS), separators=(", ", ": ")
    )

    admitted = UpdateGate(SERVICE.public_key, TOPICS).admit(
        FakeDelivery(f"{NAMESPACE}/updates/{EXP}/{PHONE}", frame)
    )

    assert isinstance(admitted.message, ModelUpdate) and admitted.message.num_examples == 40


def _flips() -> list[tuple[str, str]]:
    return [
        ("prefix: header length", "malformed"),
        ("header: num_examples", "bad_signature"),
        ("header: inside the grant", "bad_grant"),
        ("signature", "bad_signature"),
        ("payload: first byte", "payload_mismatch"),
        ("payload: last byte", "payload_mismatch"),
    ]


@pytest.mark.parametrize(("where", "reason"), _flips(), ids=[w for w, _ in _flips()])
def test_the_gate_refuses_an_independent_update_with_one_byte_flipped(
    where: str, reason: str
) -> None:
    topic, frame = _gated_update()
    length = header_length(frame)
    grant_at = value_offset(frame, '"grant":"') + len('"grant":"') + 100
    positions = {
        "prefix: header length": 7,
        "header: num_examples": value_offset(frame, '"num_examples":40') + len('"num_examples":'),
        "header: inside the grant": grant_at,
        "signature": 8 + length + 63,
        "payload: first byte": 8 + length + 64,
        "payload: last byte": -1,
    }

    with pytest.raises(Refused) as refused:
        UpdateGate(SERVICE.public_key, TOPICS).admit(
            FakeDelivery(topic, flipped(frame, positions[where]))
        )

    # A shorter header length can still leave a parsable header (a JSON value
    # that ends early); then the signature is what refuses it.
    allowed = {reason, "bad_signature"} if where.startswith("prefix") else {reason}
    assert refused.value.reason in allowed


def test_the_gate_refuses_what_the_grant_does_not_cover() -> None:
    gate = UpdateGate(SERVICE.public_key, TOPICS)
    topic, frame = _gated_update(num_examples=201, max_examples=200)
    with pytest.raises(Refused, match="not_permitted"):
        gate.admit(FakeDelivery(topic, frame))

    _, good = _gated_update()
    with pytest.raises(Refused, match="spoofed"):  # another device's topic
        gate.admit(FakeDelivery(f"{NAMESPACE}/updates/{EXP}/someone-else", good))

    text = grant(EXP, 4, PHONE, TASK_ID)
    header = update_header(read_grant(text, SERVICE.public_key), text, 3, 40)
    unsigned_by_phone = write_frame(
        Ed25519PrivateKey.generate(), header, write_safetensors(TENSORS)
    )
    with pytest.raises(Refused, match="bad_signature"):
        gate.admit(FakeDelivery(topic, unsigned_by_phone))

    forged_key = Ed25519PrivateKey.generate()
    forged_grant = base64.b64encode(
        write_frame(
            forged_key, envelope("task_grant", "coordinator", read_grant(text, SERVICE.public_key))
        )
    ).decode()
    header["body"]["grant"] = forged_grant
    with pytest.raises(Refused, match="bad_grant"):
        gate.admit(FakeDelivery(topic, write_frame(private_key_of(device(PHONE)), header, b"")))


# -- the independent reader verifies FedMQ's frames -----------------------------------


def _fedmq_frames() -> list[tuple[str, bytes]]:
    """Return frames FedMQ's own writer signs, of every kind a phone sees."""
    phone = device(PHONE)
    text = grant(EXP, 4, PHONE, TASK_ID)
    inline = ModelUpdate(
        experiment_id=EXP,
        round=4,
        device_id=PHONE,
        base_version=3,
        task_id=TASK_ID,
        num_examples=40,
        inline_weights=write_safetensors(TENSORS),
        metrics={"loss": 0.4},
        grant=text,
    )
    blob = write_safetensors(TENSORS)
    by_ref = ModelRef(
        "https://fedmq.example.org/api/v1/blobs/x", hashlib.sha256(blob).hexdigest(), len(blob)
    )
    task = TrainTask(
        message_id=TASK_ID,
        experiment_id=EXP,
        round=4,
        base_version=3,
        model=by_ref,
        training={"epochs": 1, "lr": 0.05},
        deadline_at=time.time() + 60,
        max_inline_bytes=1 << 20,
        reply_to=TOPICS.updates(EXP, PHONE),
        grant=text,
        aggregator_keys={WORKER.name: WORKER.public_key_text},
    )
    return [
        ("coordinator", encode(task, SERVICE)),
        ("coordinator", base64.b64decode(text)),
        (
            "coordinator",
            encode(ComeBackLater(experiment_id=EXP, retry_after_s=30.0, reason="x"), SERVICE),
        ),
        (
            PHONE,
            encode(
                CheckIn(device_id=PHONE, platform="android", capabilities={"examples": 9}), phone
            ),
        ),
        (PHONE, encode(CheckOut(device_id=PHONE, reason="connection lost"), phone)),
        (PHONE, encode(inline, phone)),
        (PHONE, encode(dataclasses.replace(inline, inline_weights=None, weights=by_ref), phone)),
        (PHONE, encode(task.error_reply("bad_task", "no momentum", sender=PHONE), phone)),
        (
            WORKER.name,
            encode(
                UpdateRejected(
                    experiment_id=EXP,
                    round=4,
                    update_id="7f1e2d3c4b5a69788796a5b4c3d2e1f0",
                    reason=RejectReason.STALE,
                ),
                WORKER,
            ),
        ),
    ]


def test_the_independent_reader_verifies_what_fedmq_signs() -> None:
    keys = {
        "coordinator": SERVICE.public_key,
        PHONE: raw_public_key(private_key_of(device(PHONE))),
        WORKER.name: WORKER.public_key,
    }
    for signer, frame in _fedmq_frames():
        read = read_frame(frame, keys)
        assert read.header["sender"] == signer
        if read.header["payload_field"] == "inline_weights":
            assert read_safetensors(read.payload)["fc.bias"] == TENSORS["fc.bias"]
        else:
            assert read.payload == b"" and read.header["payload_sha256"] == EMPTY_SHA256
        for at in (3, value_offset(frame, '"sender"'), 8 + header_length(frame), -1):
            with pytest.raises(NotBelieved):
                read_frame(flipped(frame, at), keys)
        with pytest.raises(NotBelieved, match="bad signature"):
            read_frame(frame, {signer: raw_public_key(Ed25519PrivateKey.generate())})


def test_a_phone_trusts_update_rejected_only_from_the_latest_tasks_aggregator_keys() -> None:
    task, *_ = _fedmq_frames()
    read = read_frame(task[1], {"coordinator": SERVICE.public_key})
    workers = {
        name: base64.b64decode(text)
        for name, text in read.header["body"]["aggregator_keys"].items()
    }
    *_, rejected = _fedmq_frames()

    assert read_frame(rejected[1], workers).header["body"]["reason"] == "stale"
    impostor = Identity.generate(WORKER.name)
    notice = UpdateRejected(
        experiment_id=EXP, round=4, update_id="x", reason=RejectReason.DUPLICATE
    )
    with pytest.raises(NotBelieved):
        read_frame(encode(notice, impostor), workers)


# -- the schemas describe the signed frames ------------------------------------------


def _validator(name: str) -> Any:
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource

    schemas = [load_schema(n) for n in schema_names()]
    registry = Registry().with_resources((s["$id"], Resource.from_contents(s)) for s in schemas)
    return Draft202012Validator(load_schema(name), registry=registry)


def _errors(header: dict[str, Any]) -> list[str]:
    return [error.message for error in _validator(header["kind"]).iter_errors(header)]


def test_every_frame_fedmq_signs_for_a_phone_validates() -> None:
    assert "task_grant" in schema_names()
    for _, frame in _fedmq_frames():
        header, _payload = split_frame(frame)
        assert _errors(header) == [], header["kind"]


def test_the_frames_of_a_real_round_and_the_independent_ones_validate(bench: Bench) -> None:
    check_in = write_frame(bench.key, check_in_header(bench.device_id, bench.experiment_id, 150))
    _check_in(bench, check_in)
    (task_frame,) = bench.inbox
    header, _ = split_frame(task_frame)
    granted = read_grant(header["body"]["grant"], bench.service_key)
    update = write_frame(bench.key, update_header(granted, header["body"]["grant"], 0, 150), b"")
    bench.transport.publish(header["reply_to"], update)  # empty weights: rejected undecodable
    bench.transport.join(timeout=60)

    kinds = []
    for topic, frame in bench.frames:
        header, _ = split_frame(frame)
        kinds.append(header["kind"])
        if header["kind"] in schema_names():
            assert _errors(header) == [], (topic, header["kind"])
        else:
            assert [e.message for e in _validator("envelope").iter_errors(header)] == []
    assert {"check_in", "train_task", "model_update", "update_rejected", "round_opened"} <= set(
        kinds
    )
    (notice,) = [
        f
        for t, f in bench.frames
        if t == f"{NAMESPACE}/device/{bench.device_id}" and b"update_rejected" in f
    ]
    assert (
        read_frame(notice, {WORKER.name: WORKER.public_key}).header["body"]["reason"]
        == "undecodable"
    )


def _header_of(frame: bytes) -> dict[str, Any]:
    header, _ = split_frame(frame)
    return copy.deepcopy(header)


def test_the_schemas_refuse_what_a_signed_frame_must_not_lack() -> None:
    frames = dict((split_frame(f)[0]["kind"], f) for _, f in _fedmq_frames())
    task, update, grant_frame = frames["train_task"], frames["model_update"], frames["task_grant"]
    cases: list[tuple[bytes, Any]] = [
        (task, lambda h: h.pop("payload_sha256")),
        (task, lambda h: h.__setitem__("payload_sha256", "E3" * 32)),
        (task, lambda h: h.__setitem__("sender", "worker-1")),
        (task, lambda h: h["body"].__setitem__("grant", "")),
        (task, lambda h: h["body"].__setitem__("grant", "not base64!")),
        (task, lambda h: h["body"]["aggregator_keys"].__setitem__("w", "AAAA")),
        (update, lambda h: h["body"].pop("grant")),
        (grant_frame, lambda h: h["body"].__setitem__("public_key", key_text(b"x" * 31))),
        (grant_frame, lambda h: h["body"].__setitem__("max_examples", 0)),
        (grant_frame, lambda h: h.__setitem__("sender", PHONE)),
        (frames["check_in"], lambda h: h["body"]["capabilities"].__setitem__("examples", 0)),
        (frames["check_out"], lambda h: h.__setitem__("sender", "")),
    ]
    for frame, change in cases:
        header = _header_of(frame)
        assert _errors(header) == []
        change(header)
        assert _errors(header) != [], header
