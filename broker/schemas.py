"""The JSON Schemas of the messages a phone sends or receives: load them, check headers.

``broker/schema/`` holds one JSON Schema (draft 2020-12) per message kind a
phone sees (secure aggregation's ``secagg_*`` stages included, and
``task_grant``: it rides, signed, inside a task and comes back inside the
answer), plus ``envelope.json`` (the header every frame carries) and
``model_ref.json``; they are the contract Kotlin and Swift code is written
against (``docs/mobile-protocol.md``). They are generated from the message
classes in ``broker.messages`` and ``broker.secagg.messages`` by ``python -m
broker.schema_gen`` (``broker/schema_gen.py``), never edited by hand. They
describe the header only: splitting a frame, signed or not, is
``broker.codec.split_frame``'s job, and checking its signature
``broker.verify``'s. Validation needs ``jsonschema``, a development
dependency imported only when a header is checked: at run time the codec's
own decoding already refuses fields of the wrong type.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

from broker.codec import split_frame
from broker.errors import CodecError
from broker.messages import MessageKind

__all__ = [
    "DEVICE_KINDS",
    "SERVICE_KINDS",
    "SHARED_SCHEMAS",
    "load_schema",
    "schema_names",
    "split_frame",
    "validate_frame",
    "validate_header",
]

DEVICE_KINDS = frozenset(
    {
        MessageKind.CHECK_IN,
        MessageKind.CHECK_OUT,
        MessageKind.TRAIN_TASK,
        MessageKind.COME_BACK_LATER,
        MessageKind.MODEL_UPDATE,
        MessageKind.UPDATE_REJECTED,
        MessageKind.ERROR_REPLY,
        MessageKind.TASK_GRANT,
        MessageKind.SECAGG_KEYS,
        MessageKind.SECAGG_NEIGHBOURS,
        MessageKind.SECAGG_SHARES,
        MessageKind.SECAGG_DELIVERY,
        MessageKind.SECAGG_UNMASK,
        MessageKind.SECAGG_REVEAL,
    }
)
"""Kinds a phone sends or receives (a grant: inside its task); each has a schema ``<kind>.json``.

The ``secagg_*`` kinds are secure aggregation's stages: a phone that serves
tasks with ``secure_aggregation`` set must implement them.
"""

SERVICE_KINDS = frozenset(
    {
        MessageKind.ROUND_OPENED,
        MessageKind.CLOSE_ROUND,
        MessageKind.ROUND_COMMITTED,
        MessageKind.ROUND_ABANDONED,
        MessageKind.ROUND_PROGRESS,
        MessageKind.PARTIAL_READY,
        MessageKind.COMBINE_ROUND,
        MessageKind.WORKER_ALIVE,
        MessageKind.ROUND_MASKED,
    }
)
"""Kinds only the coordinator and the workers exchange; ``envelope.json`` alone covers them."""

SHARED_SCHEMAS = ("envelope", "model_ref")
"""Schemas the per-kind ones refer to."""

_PACKAGE = "broker.schema"


def schema_names() -> tuple[str, ...]:
    """Return the name (file name without ``.json``) of every schema file."""
    return SHARED_SCHEMAS + tuple(sorted(kind.value for kind in DEVICE_KINDS))


def load_schema(name: str | MessageKind) -> dict[str, Any]:
    """Return one schema as parsed JSON (a fresh copy the caller may change).

    Parameters
    ----------
    name
        A message kind a phone sees, or a schema name such as ``"envelope"``.

    Returns
    -------
    dict
        The schema document.

    Raises
    ------
    ValueError
        No schema has that name (the kinds in ``SERVICE_KINDS`` have none).
    """
    key = name.value if isinstance(name, MessageKind) else name
    if key not in schema_names():
        raise ValueError(f"no schema named {key!r}; known: {', '.join(schema_names())}")
    parsed: dict[str, Any] = json.loads(_text(key))
    return parsed


def validate_header(header: Mapping[str, Any]) -> None:
    """Check a decoded frame header against the schema of its kind.

    A header of a kind in ``SERVICE_KINDS``, or of no known kind, is checked
    against ``envelope.json`` only (which refuses an unknown kind).

    Parameters
    ----------
    header
        The parsed JSON header of a frame (see ``split_frame``).

    Raises
    ------
    CodecError
        The header breaks its schema; the message names the schema, the
        place in the header and the rule.
    ModuleNotFoundError
        ``jsonschema`` is not installed (it comes with ``fedmq[dev]``).
    """
    kind = header.get("kind")
    device_kinds = {k.value for k in DEVICE_KINDS}
    name = kind if isinstance(kind, str) and kind in device_kinds else "envelope"
    validator = _validator(name)
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(dict(header)))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(the header)"
        raise CodecError(f"header breaks {name}.json at {where}: {error.message}")


def validate_frame(frame: bytes | memoryview) -> dict[str, Any]:
    """Split a frame and check its header; return the header.

    Parameters
    ----------
    frame
        One message as it travels on the bus.

    Returns
    -------
    dict
        The parsed header.

    Raises
    ------
    CodecError
        The bytes are not a frame, or its header breaks its schema.
    """
    header, _payload = split_frame(frame)
    validate_header(header)
    return header


@cache
def _text(name: str) -> str:
    """Return a schema file's text, read once from the installed package."""
    return resources.files(_PACKAGE).joinpath(f"{name}.json").read_text(encoding="utf-8")


@cache
def _validator(name: str) -> Any:
    """Return a draft 2020-12 validator for one schema, resolving ``$ref`` among the files."""
    try:
        from jsonschema import Draft202012Validator
        from referencing import Registry, Resource
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "checking headers against the schemas needs jsonschema: pip install 'fedmq[dev]'"
        ) from exc
    schemas = [load_schema(n) for n in schema_names()]
    # Each file is registered under its $id, so a relative "$ref": "envelope.json"
    # resolves to the sibling file and nothing is ever fetched over the network.
    registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas
    )
    return Draft202012Validator(load_schema(name), registry=registry)
