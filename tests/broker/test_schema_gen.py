"""The committed mobile schemas are what ``broker.schema_gen`` writes from ``broker/messages.py``.

Editing a message (a field, its type, its docstring or its ``WIRE`` metadata)
without running ``python -m broker.schema_gen`` fails here; so does a schema
that is not valid draft 2020-12 or refers to a definition that is not there.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from broker import codec, schema_gen
from broker.codec import ALL_MESSAGE_TYPES
from broker.identity import Identity
from broker.messages import WIRE, CheckIn, MessageKind, ModelRef, SecAggSettings
from broker.schemas import DEVICE_KINDS, load_schema, schema_names
from broker.secagg.messages import SecAggPeer

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_DIR = ROOT / "broker" / "schema"


def _refs(node: Any) -> list[str]:
    """Return every ``$ref`` in a schema document."""
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_the_committed_schemas_are_the_generators_output_byte_for_byte() -> None:
    generated = schema_gen.generate()

    on_disk = {p.stem: p.read_text(encoding="utf-8") for p in SCHEMA_DIR.glob("*.json")}

    assert set(on_disk) == set(generated) == set(schema_names())
    stale = sorted(name for name in generated if on_disk[name] != generated[name])
    assert not stale, f"run python -m broker.schema_gen: {', '.join(stale)}.json out of date"
    assert schema_gen.write(SCHEMA_DIR, check=True) == []


def test_the_command_writes_the_files_and_its_check_finds_each_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = ["--out", str(tmp_path)]

    assert schema_gen.main(["--check", *out]) == 1  # nothing there yet
    assert schema_gen.main(out) == 0
    assert schema_gen.main(["--check", *out]) == 0
    edited = tmp_path / "check_in.json"
    edited.write_text(edited.read_text().replace("willing", "able"))
    (tmp_path / "old_kind.json").write_text("{}")
    capsys.readouterr()

    assert schema_gen.main(["--check", *out]) == 1
    assert capsys.readouterr().out.split() == [
        f"{edited}:",
        "differs",
        f"{tmp_path / 'old_kind.json'}:",
        "differs",
    ]
    assert schema_gen.main(out) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.json" for n in schema_names())
    assert schema_gen.main(["--check", *out]) == 0


def test_every_schema_is_valid_draft_2020_12_and_every_reference_resolves() -> None:
    documents = {name: json.loads(text) for name, text in schema_gen.generate().items()}
    registry = Registry().with_resources(
        (doc["$id"], Resource.from_contents(doc)) for doc in documents.values()
    )

    for name, document in documents.items():
        Draft202012Validator.check_schema(document)
        resolver = registry.resolver(base_uri=document["$id"])
        for ref in _refs(document):
            resolver.lookup(ref)  # raises for a file or a definition that is not there
        secagg = name.startswith("secagg_")  # the stages are declared with secure aggregation
        source = "broker/secagg/messages.py" if secagg else "broker/messages.py"
        assert document["$comment"].startswith(f"Generated from {source} by"), name


def test_the_schema_of_every_kind_is_valid_too() -> None:
    for kind in MessageKind:
        schema = schema_gen.message_schema(kind)

        Draft202012Validator.check_schema(schema)
        assert schema["properties"]["kind"] == {"const": kind.value}


def test_a_message_field_without_a_docstring_stops_the_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    documented = schema_gen._field_docs

    def forgetful(cls: type) -> dict[str, str]:
        docs = dict(documented(cls))
        if cls is CheckIn:
            del docs["platform"]
        return docs

    monkeypatch.setattr(schema_gen, "_field_docs", forgetful)

    with pytest.raises(ValueError, match=r"CheckIn\.platform"):
        schema_gen.generate()


@pytest.mark.parametrize(("nested", "field"), [(SecAggSettings, "scale"), (SecAggPeer, "index")])
def test_a_nested_class_without_its_docstrings_stops_the_generator(
    monkeypatch: pytest.MonkeyPatch, nested: type, field: str
) -> None:
    documented = schema_gen._field_docs

    def forgetful(cls: type) -> dict[str, str]:
        docs = dict(documented(cls))
        if cls is nested:
            del docs[field]
        return docs

    monkeypatch.setattr(schema_gen, "_field_docs", forgetful)

    with pytest.raises(ValueError, match=rf"{nested.__name__}\.{field}"):
        schema_gen.generate()


def test_a_nested_dataclass_is_an_object_written_in_place_with_its_docstrings() -> None:
    task = load_schema("train_task")["$defs"]["body"]["properties"]["secure_aggregation"]
    peers = load_schema("secagg_neighbours")["$defs"]["body"]["properties"]["peers"]

    settings, null = task["anyOf"]
    peer = peers["additionalProperties"]
    assert null == {"type": "null"} and task["default"] is None
    for schema, cls in ((settings, SecAggSettings), (peer, SecAggPeer)):
        fields = [f.name for f in dataclasses.fields(cls)]
        assert schema["title"] == cls.__name__
        assert schema["description"] == schema_gen._doc(cls)
        assert list(schema["properties"]) == schema["required"] == fields
        assert schema["additionalProperties"] is False
        assert all(schema["properties"][name]["description"] for name in fields)
    assert settings["properties"]["scale"]["exclusiveMinimum"] == 0
    assert peers["propertyNames"] == {"$ref": "envelope.json#/$defs/segment"}
    assert peer["properties"]["mask_key"]["$ref"] == "envelope.json#/$defs/public_key"


def test_descriptions_are_the_docstrings_as_one_paragraph() -> None:
    body = load_schema("check_in")["$defs"]["body"]["properties"]

    assert load_schema("check_in")["description"].startswith(
        "A device is online and willing to train. Sent after every (re)connect"
    )
    assert body["platform"]["description"] == (
        "What the device runs on (at most 32 characters); recorded by the service "
        "(GET /api/v1/devices)."
    )
    assert "``" not in json.dumps([load_schema(name) for name in schema_names()])


def test_constraints_are_the_wire_metadata_of_the_fields() -> None:
    platform = next(f for f in dataclasses.fields(CheckIn) if f.name == "platform")
    size = next(f for f in dataclasses.fields(ModelRef) if f.name == "size")

    described = load_schema("check_in")["$defs"]["body"]["properties"]["platform"]

    assert described["maxLength"] == platform.metadata[WIRE]["maxLength"] == 32
    assert (
        load_schema("model_ref")["properties"]["size"]["minimum"] == size.metadata[WIRE]["minimum"]
    )


@pytest.mark.parametrize("kind", list(MessageKind), ids=lambda k: k.value)
def test_the_payload_field_is_the_one_the_codec_carries_as_payload(kind: MessageKind) -> None:
    cls = ALL_MESSAGE_TYPES[kind]

    described = schema_gen.message_schema(kind)["properties"]["payload_field"]

    binary = sorted(codec._binary_fields(cls))
    assert described == ({"enum": [*binary, None]} if binary else {"type": "null"})


def test_the_envelope_lists_the_header_keys_in_the_order_the_codec_writes_them() -> None:
    message = CheckIn(device_id="d", platform="android")

    header, _ = codec.split_frame(codec.encode(message, Identity.generate("d")))

    assert list(load_schema("envelope")["properties"]) == list(header)
    assert set(codec._ENVELOPE_FIELDS) == set(schema_gen._ENVELOPE_FIELDS)


def test_only_the_phone_facing_kinds_have_routes() -> None:
    from broker import _schema_words

    assert set(_schema_words.ROUTES) == DEVICE_KINDS
    for kind in DEVICE_KINDS:
        assert load_schema(kind)["title"].startswith(ALL_MESSAGE_TYPES[kind].__name__ + " (")


def test_a_type_the_codec_cannot_carry_is_refused() -> None:
    with pytest.raises(TypeError, match="no JSON Schema"):
        schema_gen._schema(set[int], {}, "envelope")
    with pytest.raises(TypeError, match="segment describes a str"):
        schema_gen._schema(int, {"$ref": "segment"}, "envelope")
    with pytest.raises(TypeError, match="do not apply"):
        schema_gen._schema(str, {"keys": {"minLength": 1}}, "envelope")
