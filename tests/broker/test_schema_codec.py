"""The generated schemas and the codec agree: on what it writes, and on what it refuses.

For every message kind (the phone-facing ones against their committed files,
the others against ``schema_gen.message_schema``): what ``codec.encode`` writes
validates; a header the schema accepts, ``codec.decode`` decodes; a value of a
JSON type the schema does not list is refused by both; a field left out is
refused by the schema, and by the decoder unless the field has a default,
which is then the one the schema gives. Where the schema is stricter than
the decoder it says so by a narrowing (a pattern, a minimum), never by a type.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from broker import (
    CloseRound,
    CombineRound,
    MaskedSumTerms,
    Message,
    MessageKind,
    ModelRef,
    ModelUpdate,
    PartialReady,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    RoundProgress,
    StrategySpec,
    TrainTask,
    WorkerAlive,
    codec,
    schema_gen,
)
from broker.errors import CodecError
from broker.schemas import DEVICE_KINDS
from broker.secagg.messages import RoundMasked
from tests.broker.test_message_schemas import SAMPLES, TASK_ID, signed
from tests.identities import SERVICE, WORKER

EXPERIMENT = "digits-fedavg-1a2b3c4d"
REF = ModelRef("https://store.example.org/blobs/ab", "ab" * 32, 1234)
SERVICE_SAMPLES: list[Message] = [
    RoundOpened(
        experiment_id=EXPERIMENT,
        round=4,
        base_version=3,
        model=REF,
        selected=("a", "b"),
        target_reports=2,
        min_reports=1,
        deadline_at=1.7e9,
        strategy=StrategySpec(
            "fedprox", {"mu": 0.01, "lr": None}, MaskedSumTerms(clip=1.5, max_examples=64)
        ),
    ),
    CloseRound(experiment_id=EXPERIMENT, round=4),
    RoundCommitted(
        experiment_id=EXPERIMENT,
        round=4,
        version=4,
        model=REF,
        reported=3,
        accepted=(TASK_ID,),
        accepted_devices=("a",),
        rejected={"stale": 1},
        num_examples=120,
        metrics={"loss": 0.3},
        refused={"forged": 2},
    ),
    RoundAbandoned(experiment_id=EXPERIMENT, round=4, reason="deadline", reported=1),
    RoundProgress(experiment_id=EXPERIMENT, round=4, reported=("a", "b"), accepted=("a",)),
    PartialReady(experiment_id=EXPERIMENT, round=4, sequence=-1),
    CombineRound(experiment_id=EXPERIMENT, round=4, base_version=3, model=REF, min_reports=1),
    WorkerAlive(group="fedmq-aggregators"),
    RoundMasked(experiment_id=EXPERIMENT, round=4, devices=("a", "b", "c"), reported=4),
]
EVERY_SAMPLE = [*SAMPLES, *SERVICE_SAMPLES]
# One JSON value of each type, and the edge values of the narrowings.
PALETTE: list[Any] = [True, 7, -1, 0, 4.5, "x", "", None, [1], {"k": 1}, {}]


def _documents() -> dict[str, dict[str, Any]]:
    documents = {name: json.loads(text) for name, text in schema_gen.generate().items()}
    for kind in set(MessageKind) - DEVICE_KINDS:
        documents[kind.value] = schema_gen.message_schema(kind)
    return documents


DOCUMENTS = _documents()
REGISTRY: Registry[Any] = Registry().with_resources(
    (doc["$id"], Resource.from_contents(doc)) for doc in DOCUMENTS.values()
)


def _validator(kind: str) -> Draft202012Validator:
    return Draft202012Validator(DOCUMENTS[kind], registry=REGISTRY)


def _schema_accepts(header: dict[str, Any]) -> bool:
    return _validator(header["kind"]).is_valid(header)


def _decoder_accepts(header: dict[str, Any], payload: bytes) -> bool:
    raw = json.dumps(header).encode()
    try:
        codec.decode(struct.pack(">3sBI", b"FMQ", 1, len(raw)) + raw + payload)
    except CodecError:
        return False
    return True


def _sign(message: Message) -> bytes:
    if message.KIND in DEVICE_KINDS:
        return signed(message)
    workers = (
        MessageKind.ROUND_COMMITTED,
        MessageKind.ROUND_ABANDONED,
        MessageKind.WORKER_ALIVE,
        MessageKind.ROUND_MASKED,
    )
    return codec.encode(message, WORKER if message.KIND in workers else SERVICE)


def _split(message: Message) -> tuple[dict[str, Any], bytes]:
    header, payload = codec.split_frame(_sign(message))
    return copy.deepcopy(header), bytes(payload)


def _one_per_shape() -> list[Message]:
    """Return the first sample of each kind, both ways an update travels, a secure task."""
    seen: set[tuple[MessageKind, bool]] = set()
    chosen = []
    for message in EVERY_SAMPLE:
        inline = isinstance(message, ModelUpdate) and message.weights is None
        secure = isinstance(message, TrainTask) and message.secure_aggregation is not None
        key = (message.KIND, inline or secure)
        if key not in seen:
            seen.add(key)
            chosen.append(message)
    return chosen


SHAPES = _one_per_shape()


def _inner(message: Message, name: str) -> type | None:
    """Return the class of the dataclass a body field holds (ModelRef, SecAggSettings), or None."""
    value = getattr(message, name)
    return type(value) if dataclasses.is_dataclass(value) else None


def _places(message: Message, body: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """Yield the path of every body field, and of every field of a dataclass in the body."""
    for name, value in body.items():
        yield (name,)
        if _inner(message, name) is not None:
            yield from ((name, inner) for inner in value)


def _at(header: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    target: dict[str, Any] = header["body"]
    for key in path[:-1]:
        target = target[key]
    return target


def _declared_types(schema: Any, resolver: Any) -> set[str]:
    """Return the JSON types a schema lets through, ignoring every narrowing but type."""
    allowed = {"null", "boolean", "integer", "number", "string", "array", "object"}
    if not isinstance(schema, dict):
        return allowed if schema is not False else set()
    if "$ref" in schema:
        resolved = resolver.lookup(schema["$ref"])
        allowed &= _declared_types(resolved.contents, resolved.resolver)
    if "type" in schema:
        listed = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        allowed &= set(listed) | ({"integer"} if "number" in listed else set())
    if "anyOf" in schema:
        allowed &= set().union(*(_declared_types(s, resolver) for s in schema["anyOf"]))
    for values in ([schema["const"]] if "const" in schema else [], schema.get("enum", [])):
        if values:
            allowed &= {_json_type(v) for v in values}
    return allowed


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array"}
    return "null" if value is None else names.get(type(value), "object")


def _field_schema(kind: str, path: tuple[str, ...]) -> tuple[Any, Any]:
    """Return the schema of one body place, and the resolver to read its references with."""
    resolver = REGISTRY.resolver(base_uri=DOCUMENTS[kind]["$id"])
    schema: Any = DOCUMENTS[kind]["$defs"]["body"]
    for key in path:
        while "properties" not in schema:  # to the object: through references and optionals
            if "anyOf" in schema:
                schema = next(s for s in schema["anyOf"] if s != {"type": "null"})
            else:
                resolved = resolver.lookup(schema["$ref"])
                schema, resolver = resolved.contents, resolved.resolver
        schema = schema["properties"][key]
    return schema, resolver


# -- what the codec writes validates ----------------------------------------------


@pytest.mark.parametrize("message", EVERY_SAMPLE, ids=lambda m: m.KIND.value)
def test_every_frame_the_codec_writes_validates(message: Message) -> None:
    header, payload = _split(message)

    errors = [e.message for e in _validator(header["kind"]).iter_errors(header)]

    assert errors == []
    assert _decoder_accepts(header, payload)


def test_every_kind_has_a_sample() -> None:
    assert {m.KIND for m in EVERY_SAMPLE} == set(MessageKind)


# -- what one refuses, the other refuses -------------------------------------------


@pytest.mark.parametrize("message", SHAPES, ids=lambda m: m.KIND.value)
def test_a_value_the_schema_accepts_the_decoder_accepts(message: Message) -> None:
    header, payload = _split(message)
    checked = 0

    for path in _places(message, header["body"]):
        schema, resolver = _field_schema(header["kind"], path)
        declared = _declared_types(schema, resolver)
        for value in PALETTE:
            changed = copy.deepcopy(header)
            _at(changed, path)[path[-1]] = value

            by_schema, by_decoder = _schema_accepts(changed), _decoder_accepts(changed, payload)

            assert by_decoder or not by_schema, f"{path}={value!r}: schema accepts, codec refuses"
            if _json_type(value) not in declared:
                assert not by_schema and not by_decoder, f"{path}={value!r}: a wrong type passed"
            checked += 1
    assert checked >= len(PALETTE) * len(header["body"])


@pytest.mark.parametrize("message", SHAPES, ids=lambda m: m.KIND.value)
def test_a_missing_field_is_refused_or_read_as_the_schemas_default(message: Message) -> None:
    header, payload = _split(message)
    fields = {f.name: f for f in dataclasses.fields(type(message))}

    for path in _places(message, header["body"]):
        changed = copy.deepcopy(header)
        del _at(changed, path)[path[-1]]
        schema, _ = _field_schema(header["kind"], path)

        if path[0] in codec._binary_fields(type(message)):  # the payload's field: never required
            assert _schema_accepts(changed) and _decoder_accepts(changed, payload)
            continue
        assert not _schema_accepts(changed), f"{path} may be left out"
        if len(path) > 1:  # in a ModelRef or another dataclass
            inner = _inner(message, path[0])
            assert inner is not None
            owner = {f.name: f for f in dataclasses.fields(inner)}[path[-1]]
        else:
            owner = fields[path[0]]
        has_default = (owner.default, owner.default_factory) != (dataclasses.MISSING,) * 2
        assert _decoder_accepts(changed, payload) == has_default, path
        if has_default and len(path) == 1:
            raw = json.dumps(changed).encode()
            frame = struct.pack(">3sBI", b"FMQ", 1, len(raw)) + raw + payload
            decoded = codec.decode(frame)
            assert codec._to_json(getattr(decoded, path[0])) == schema["default"], path


@pytest.mark.parametrize("message", SHAPES, ids=lambda m: m.KIND.value)
def test_an_unknown_field_is_refused_by_both_in_a_body_and_a_model_ref(message: Message) -> None:
    header, payload = _split(message)
    refs = [(k,) for k in header["body"] if _inner(message, k) is not None]

    for path in [(), *refs]:
        changed = copy.deepcopy(header)
        target = changed["body"]
        for key in path:
            target = target[key]
        target["priority"] = 1

        assert not _schema_accepts(changed), path
        assert not _decoder_accepts(changed, payload), path


def test_an_unknown_header_key_is_refused_by_the_schema_and_ignored_by_the_reader() -> None:
    # The schemas say what a writer writes; FedMQ's reader ignores header keys it
    # does not know, so that a later version may add one (docs/mobile-protocol.md).
    header, payload = _split(SAMPLES[0])
    header["trace_id"] = "x"

    assert not _schema_accepts(header)
    assert _decoder_accepts(header, payload)


def test_an_integral_float_is_the_one_integer_the_schema_cannot_refuse() -> None:
    # JSON Schema counts 4.0 as an integer; the codec refuses it, and the
    # envelope's description tells writers so.
    task = next(m for m in SAMPLES if m.KIND is MessageKind.TRAIN_TASK)
    header, payload = _split(task)
    header["body"]["round"] = 4.0

    assert _schema_accepts(header)
    assert not _decoder_accepts(header, payload)
    assert "4.0" in DOCUMENTS["envelope"]["description"]


def test_inline_weights_and_a_reference_exclude_each_other() -> None:
    inline = next(m for m in SHAPES if isinstance(m, ModelUpdate) and m.weights is None)
    header, _payload = _split(inline)
    with_ref = copy.deepcopy(header)
    with_ref["body"]["weights"] = dataclasses.asdict(REF)
    neither = copy.deepcopy(header)
    neither["payload_field"] = None

    assert _schema_accepts(header)
    assert not _schema_accepts(with_ref)
    assert not _schema_accepts(neither)
