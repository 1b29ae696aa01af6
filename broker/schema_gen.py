"""Write the mobile JSON Schemas from the typed messages: ``python -m broker.schema_gen``.

Every file in ``broker/schema/`` is this module's output, never edited by hand:

- the message classes are those the codec reads (``broker.codec.ALL_MESSAGE_TYPES``:
  ``broker.messages`` and secure aggregation's ``broker.secagg.messages``);
- a body's properties are the message dataclass's fields (less the envelope's),
  each typed from its annotation as ``broker.codec`` reads it: ``str`` a
  string, ``int`` an integer, ``float`` a number, ``bool`` a boolean, an
  ``Enum`` its values, ``X | None`` X or null, a union of scalars their JSON
  types, ``Mapping[str, V]`` an object of V, ``tuple[X, ...]`` an array of X,
  ``ModelRef`` a reference to ``model_ref.json``, any other dataclass (such
  as ``SecAggSettings``) an object of its fields written in place, like a
  body; the one ``bytes`` field is the frame's payload, so in the body it is
  only ever null;
- every field the codec writes is required, and a field with a Python default
  has it as its ``default`` (what the reader assumes when the field is
  absent); a body, a ``ModelRef`` or a nested dataclass takes no other key,
  as the codec refuses unknown fields;
- descriptions are the classes' and the fields' docstrings (a nested
  dataclass's too); what a type does not say (patterns, minimums, the shared
  definitions) is each field's ``broker.messages.WIRE`` metadata;
- the header keys the codec adds (``schema_version``, ``kind``, ``body``,
  ``payload_field``, ``payload_sha256``) and who sends each kind on which
  topic are described in ``broker._schema_words``.

``python -m broker.schema_gen`` rewrites the files; ``--check`` only compares
them (exit 1 when one differs). ``tests/broker/test_schema_gen.py`` fails when
the committed files are not the output.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import operator
import types
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from broker import _schema_words as words
from broker.codec import ALL_MESSAGE_TYPES
from broker.messages import SCHEMA_VERSION, WIRE, Message, MessageKind, ModelRef
from broker.schemas import DEVICE_KINDS, SHARED_SCHEMAS, schema_names

__all__ = ["SCHEMA_DIR", "body_schema", "generate", "main", "message_schema", "render", "write"]

SCHEMA_DIR = Path(__file__).with_name("schema")
"""Where the generated files are committed (the package ``broker.schema``)."""

DRAFT = "https://json-schema.org/draft/2020-12/schema"
_ENVELOPE_FIELDS = tuple(f.name for f in dataclasses.fields(Message))
_JSON_TYPES: Mapping[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_DIRECTIVES = frozenset({"$ref", "keys", "values", "instead_of"})
_WIDTH = 100
"""A JSON object or array fitting on one line of this many characters is written on one."""


def generate() -> dict[str, str]:
    """Return the text of every schema file, by name (the file name without ``.json``).

    Raises
    ------
    ValueError
        A phone-facing message, a dataclass nested in one, ``ModelRef`` or an
        envelope field lacks a docstring.
    """
    messages = [ALL_MESSAGE_TYPES[kind] for kind in DEVICE_KINDS]
    classes = dict.fromkeys([Message, ModelRef, *messages, *_nested(messages)])
    missing = {cls: _undescribed(cls) for cls in classes}
    names = sorted(name for found in missing.values() for name in found)
    if names:
        where = sorted({_source(cls) for cls, found in missing.items() if found})
        raise ValueError(f"describe these in {', '.join(where)}: {', '.join(names)}")
    shared = {"envelope": _envelope, "model_ref": _model_ref}
    assert set(shared) == set(SHARED_SCHEMAS)
    return {
        name: render(shared[name]() if name in shared else message_schema(MessageKind(name)))
        for name in schema_names()
    }


def write(directory: Path = SCHEMA_DIR, *, check: bool = False) -> list[str]:
    """Write the schema files into ``directory``; return the names of those that changed.

    Parameters
    ----------
    directory
        The folder of the files (``broker/schema`` by default).
    check
        Only compare: write nothing.

    Returns
    -------
    list of str
        The files (``name.json``) that differ from the output or are missing,
        and the ``.json`` files there that the generator does not write
        (removed unless ``check``).
    """
    expected = {f"{name}.json": text for name, text in generate().items()}
    if not check:
        directory.mkdir(parents=True, exist_ok=True)
    changed = []
    for file_name, text in expected.items():
        path = directory / file_name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            changed.append(file_name)
            if not check:
                path.write_text(text, encoding="utf-8")
    for stray in sorted(p for p in directory.glob("*.json") if p.name not in expected):
        changed.append(stray.name)
        if not check:
            stray.unlink()
    return changed


def message_schema(kind: MessageKind) -> dict[str, Any]:
    """Return the JSON Schema of one kind's frame header (any kind, phone-facing or not).

    Parameters
    ----------
    kind
        The message kind.

    Returns
    -------
    dict
        A draft 2020-12 schema whose ``$id`` is ``<kind>.json`` next to
        ``envelope.json`` and ``model_ref.json``, which it refers to.
    """
    cls, name = ALL_MESSAGE_TYPES[kind], kind.value
    route = words.ROUTES.get(kind)
    hints = get_type_hints(cls)
    binary = [f.name for f in dataclasses.fields(cls) if _is_binary(hints[f.name])]
    properties: dict[str, Any] = {"kind": {"const": name}}
    if route is not None:
        properties["sender"] = route.sender
        if route.reply_to is not None:
            properties["reply_to"] = route.reply_to
    properties["payload_field"] = {"enum": [*binary, None]} if binary else {"type": "null"}
    properties["body"] = {"$ref": "#/$defs/body"}
    return {
        **_heading(
            name,
            f"{cls.__name__} ({route.note})" if route else cls.__name__,
            _doc(cls),
            source=_source(cls),
        ),
        "allOf": [{"$ref": "envelope.json"}],
        "properties": properties,
        **_alternatives(cls, name),
        "$defs": {"body": body_schema(cls, here=name)},
    }


def body_schema(cls: type, *, here: str) -> dict[str, Any]:
    """Return the schema of a message's body (or of another dataclass): an object of its fields.

    Parameters
    ----------
    cls
        A message class, ``ModelRef``, or a dataclass a message nests.
    here
        The name of the schema file it goes into: references to shared
        definitions are written relative to it.

    Returns
    -------
    dict
        ``{"type": "object", "properties", "required", "additionalProperties": false}``.
    """
    hints, docs = get_type_hints(cls), _field_docs(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in _fields(cls):
        properties[f.name] = _property(f, hints[f.name], docs.get(f.name, ""), here)
        if not _is_binary(hints[f.name]):
            required.append(f.name)
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def render(document: Mapping[str, Any]) -> str:
    """Return a schema as the text of its file: indented JSON, short parts on one line."""
    return _render(document, 0, 0) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the schema files; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m broker.schema_gen",
        description="Write broker/schema/*.json from the messages in broker/messages.py "
        "and broker/secagg/messages.py.",
        epilog="example: python -m broker.schema_gen --check",
    )
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a change")
    parser.add_argument("--out", type=Path, default=SCHEMA_DIR, help="folder of the files")
    args = parser.parse_args(argv)
    changed = write(args.out, check=args.check)
    verb = "differs" if args.check else "written"
    for file_name in changed:
        print(f"{args.out / file_name}: {verb}")
    return 1 if args.check and changed else 0


# -- the three kinds of document --------------------------------------------------


def _heading(
    name: str, title: str, description: str, *, source: str = "broker/messages.py"
) -> dict[str, Any]:
    return {
        "$schema": DRAFT,
        "$id": f"https://fedmq.invalid/schema/{SCHEMA_VERSION}/{name}.json",
        "$comment": f"Generated from {source} by python -m broker.schema_gen; do not edit",
        "title": title,
        "description": description,
    }


def _envelope() -> dict[str, Any]:
    here = "envelope"
    hints, docs = get_type_hints(Message), _field_docs(Message)
    envelope = {f.name: _property(f, hints[f.name], docs[f.name], here) for f in _fields(Message)}
    properties = {
        "schema_version": {"description": words.SCHEMA_VERSION, "const": SCHEMA_VERSION},
        "kind": {"description": words.KIND, **_schema(MessageKind, {}, here)},
        **envelope,
        "body": {"description": words.BODY, "type": "object"},
        "payload_field": {
            "description": words.PAYLOAD_FIELD,
            **_schema(str | None, {}, here),
            "default": None,
        },
        "payload_sha256": {"description": words.PAYLOAD_SHA256, **_ref("sha256", here)},
    }
    by_type = {
        name: {"description": text, **_shape(hint, {}, here)}
        for hint, (name, text) in words.SHARED_TYPES.items()
    }
    return {
        **_heading(here, "FedMQ frame header", words.ENVELOPE),
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
        "$defs": {**_shared_defs(here), **by_type},
    }


def _model_ref() -> dict[str, Any]:
    here = "model_ref"
    return {
        **_heading(here, "ModelRef", _doc(ModelRef)),
        **body_schema(ModelRef, here=here),
        "$defs": _shared_defs(here),
    }


def _alternatives(cls: type, here: str) -> dict[str, Any]:
    """Return the if/then/else saying that a binary payload and its stand-in exclude each other."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        other = f.metadata.get(WIRE, {}).get("instead_of")
        if other is None:
            continue
        (stand_in,) = [g for g in dataclasses.fields(cls) if g.name == other]
        present = _schema(_without_none(hints[other]), stand_in.metadata.get(WIRE, {}), here)
        return {
            "if": {
                "properties": {"payload_field": {"const": f.name}},
                "required": ["payload_field"],
            },
            "then": {"properties": {"body": {"properties": {other: {"type": "null"}}}}},
            "else": {"properties": {"body": {"properties": {other: present}}}},
        }
    return {}


# -- from a type to its schema ------------------------------------------------------


def _property(f: dataclasses.Field[Any], hint: Any, doc: str, here: str) -> dict[str, Any]:
    """Return one field's schema: description, type and narrowing, default."""
    wire = {k: v for k, v in f.metadata.get(WIRE, {}).items() if k != "instead_of"}
    if _is_binary(hint):
        if type(None) not in get_args(hint):
            raise TypeError(f"{f.name}: a binary field must be optional (it is the payload)")
        schema: dict[str, Any] = {"type": "null"}
    else:
        schema = _schema(hint, wire, here)
    described = {"description": doc} if doc else {}
    return {**described, **schema, **_default(f)}


def _schema(hint: Any, wire: Mapping[str, Any], here: str) -> dict[str, Any]:
    """Return the schema of a value of type ``hint``, narrowed by ``wire`` (see ``WIRE``)."""
    rest = dict(wire)
    if _is_union(hint) and type(None) in get_args(hint):
        inner = _schema(_without_none(hint), rest, here)
        if list(inner) == ["type"] and isinstance(inner["type"], str):
            return {"type": [inner["type"], "null"]}
        return {"anyOf": [inner, {"type": "null"}]}
    name = rest.pop("$ref", None)
    if name is not None:
        if hint is not words.SHARED[name].python:
            raise TypeError(f"{name} describes a {words.SHARED[name].python.__name__}, not {hint}")
        base = _ref(name, here)
    elif hint in words.SHARED_TYPES:
        base = _ref(words.SHARED_TYPES[hint][0], here)
    else:
        base = _shape(hint, rest, here)
    if _DIRECTIVES & rest.keys():
        raise TypeError(f"{sorted(_DIRECTIVES & rest.keys())} do not apply to {hint}")
    return {**base, **rest}


def _shape(hint: Any, rest: dict[str, Any], here: str) -> dict[str, Any]:
    """Return the schema a type gives by itself; pops the map directives it uses from ``rest``."""
    origin, args = get_origin(hint), get_args(hint)
    if _is_union(hint):  # the codec reads a union of JSON scalars only
        names = [_JSON_TYPES[a] for a in args]
        # A JSON integer is a number: "integer" says nothing once "number" is there.
        kept = [n for n in names if n != "integer" or "number" not in names]
        return {"type": list(dict.fromkeys(kept))}
    if hint is ModelRef:
        return {"$ref": "model_ref.json"}
    if _is_nested(hint):
        return {"title": hint.__name__, "description": _doc(hint), **body_schema(hint, here=here)}
    if isinstance(hint, type) and issubclass(hint, Enum):
        return {"enum": [member.value for member in hint]}
    if origin is tuple:
        return {"type": "array", "items": _schema(args[0], {}, here)}
    if origin in (Mapping, dict):
        schema: dict[str, Any] = {"type": "object"}
        if "keys" in rest:
            # Narrowed like a string field (a shared "$ref" resolved); a name is always a string.
            keys = _schema(str, rest.pop("keys"), here)
            schema["propertyNames"] = {k: v for k, v in keys.items() if k != "type"}
        values = _schema(args[1], rest.pop("values", {}), here)
        return {**schema, "additionalProperties": values} if values else schema
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if hint is Any:
        return {}
    raise TypeError(f"no JSON Schema for {hint!r}: the codec does not carry it")


def _shared_defs(here: str) -> dict[str, Any]:
    """Return the shared definitions kept in one file: description, JSON type, constraints."""
    defs = {}
    for name, definition in words.SHARED.items():
        if definition.home == here:
            keywords = dict(definition.keywords)
            described = (
                {"description": keywords.pop("description")} if "description" in keywords else {}
            )
            defs[name] = {**described, "type": _JSON_TYPES[definition.python], **keywords}
    return defs


def _ref(name: str, here: str) -> dict[str, Any]:
    home = words.SHARED[name].home if name in words.SHARED else "envelope"
    return {"$ref": f"#/$defs/{name}" if home == here else f"{home}.json#/$defs/{name}"}


def _default(f: dataclasses.Field[Any]) -> dict[str, Any]:
    """Return ``{"default": ...}`` when the field has a constant default, else ``{}``."""
    if f.default is not dataclasses.MISSING:
        value: Any = f.default
    elif f.default_factory in (dict, list, tuple):
        value = f.default_factory()
    elif isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
        value = dataclasses.asdict(f.default_factory())  # a typed value with defaults throughout
    else:
        return {}
    return {"default": value.value if isinstance(value, Enum) else json.loads(json.dumps(value))}


def _is_union(hint: Any) -> bool:
    return get_origin(hint) in (Union, types.UnionType)


def _without_none(hint: Any) -> Any:
    options = [a for a in get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    return functools.reduce(operator.or_, options)


def _is_nested(hint: Any) -> bool:
    """Return whether a type is a dataclass written in place (not a message, not ``ModelRef``)."""
    return (
        isinstance(hint, type)
        and dataclasses.is_dataclass(hint)
        and hint is not ModelRef
        and not issubclass(hint, Message)
    )


def _nested(classes: Sequence[type]) -> list[type]:
    """Return the dataclasses written in place in ``classes``' fields, at any depth."""
    found: list[type] = []
    pending = list(classes)
    while pending:
        hints = list(get_type_hints(pending.pop()).values())
        while hints:
            hint = hints.pop()
            hints.extend(get_args(hint))
            if _is_nested(hint) and hint not in found:
                found.append(hint)
                pending.append(hint)
    return found


def _is_binary(hint: Any) -> bool:
    """Return whether a field carries the frame's payload (``bytes``; the codec's rule)."""
    return any(a in (bytes, memoryview) for a in (get_args(hint) if _is_union(hint) else (hint,)))


# -- descriptions from docstrings -------------------------------------------------


def _source(cls: type) -> str:
    """Return the file a class is declared in, relative to the repository."""
    return cls.__module__.replace(".", "/") + ".py"


def _doc(cls: type) -> str:
    """Return a class's docstring as one paragraph of plain text."""
    return _prose(cls.__doc__ or "")


def _prose(text: str) -> str:
    return " ".join(inspect.cleandoc(text).replace("``", "").split())


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Return the docstrings written under a dataclass's fields (its bases' included), as text."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        (node,) = ast.parse(inspect.getsource(klass)).body
        assert isinstance(node, ast.ClassDef)
        for item, after in zip(node.body, node.body[1:], strict=False):
            match item, after:
                case ast.AnnAssign(target=ast.Name(id=name)), ast.Expr(ast.Constant(str(text))):
                    docs[name] = _prose(text)
    return docs


def _undescribed(cls: type) -> list[str]:
    """Return ``Class.field`` for each field (and ``Class`` itself) that has no docstring."""
    docs = _field_docs(cls)
    names = [f.name for f in _fields(cls) if f.name not in docs]
    return [f"{cls.__name__}.{name}" for name in names] + ([] if cls.__doc__ else [cls.__name__])


def _fields(cls: type) -> list[dataclasses.Field[Any]]:
    """Return a class's own wire fields (a message's less the envelope's)."""
    own = cls is Message or not issubclass(cls, Message)
    return [f for f in dataclasses.fields(cls) if own or f.name not in _ENVELOPE_FIELDS]


# -- writing JSON for people ------------------------------------------------------


def _render(value: Any, indent: int, column: int) -> str:
    flat = json.dumps(value, ensure_ascii=False)
    nonempty = isinstance(value, dict | list) and value
    if not nonempty or (indent and column + len(flat) < _WIDTH):
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        lines = []
        for key, item in value.items():
            head = f"{pad}{json.dumps(key, ensure_ascii=False)}: "
            lines.append(head + _render(item, indent + 2, len(head)))
    else:
        lines = [pad + _render(item, indent + 2, len(pad)) for item in value]
    opening, closing = ("{", "}") if isinstance(value, dict) else ("[", "]")
    return opening + "\n" + ",\n".join(lines) + "\n" + " " * indent + closing


if __name__ == "__main__":
    raise SystemExit(main())
