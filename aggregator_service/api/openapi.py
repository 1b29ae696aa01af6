"""The REST API's OpenAPI 3.1 document, generated from the typed bodies in ``contracts.py``.

``OPERATIONS`` is the one table of what the API does: each operation's
method, path, who may call it, its body, its answer and the errors it may
give. The body schemas come from the pydantic models (JSON Schema 2020-12,
which OpenAPI 3.1 takes as is), so the document cannot describe a body the
models do not. ``tests/aggregator_service/test_openapi.py`` validates the
document and the views' real answers against it; ``test_api_fuzz.py`` runs
schemathesis against it.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from aggregator_service.api import contracts as c
from aggregator_service.api.errors import MAX_BODY_BYTES, PATH_ID

__all__ = ["OPERATIONS", "Operation", "document"]

_REF = "#/components/schemas/{model}"
Auth = Literal["admin", "viewer", "enrollment", "signed"]

_SECURITY: dict[Auth, list[dict[str, list[str]]]] = {
    "admin": [{"admin": []}],
    # The admin token opens every read, and registers devices too.
    "viewer": [{"viewer": []}, {"admin": []}],
    "enrollment": [{"enrollment": []}, {"admin": []}],
    # A signed URL is its own credential: expiry and HMAC in the query.
    "signed": [],
}
_ERRORS = {
    "400": (
        "BadRequest",
        "A malformed body or parameter (`bad_request`), or a config no run could use "
        "(`invalid_config`, with every problem in `error.problems`).",
    ),
    "401": ("Unauthorized", "No valid bearer token for this call."),
    "403": ("Forbidden", "An expired, tampered or unsigned URL."),
    "404": ("NotFound", "No such experiment, model version, device, config or blob."),
    "409": ("Conflict", "The call clashes with the current state."),
    "413": ("PayloadTooLarge", f"A body above the limit ({MAX_BODY_BYTES} bytes for JSON)."),
}


def _path(name: str, description: str, pattern: str = f"^{PATH_ID.pattern}$") -> dict[str, Any]:
    schema = {"type": "string", "pattern": pattern}
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


_EXPERIMENT = _path("experiment_id", "An experiment's id (anything else is 404).")
_SIGNED = tuple(
    {"name": name, "in": "query", "required": True, "schema": {"type": "string", "pattern": p}}
    for name, p in (("expires", "^[0-9]{1,12}$"), ("signature", "^[0-9a-f]{64}$"))
)
_DEVICE = _path("device_id", "A device's id.", "^[A-Za-z0-9_-]{1,128}$")
_VERSION = {
    "name": "version",
    "in": "query",
    "description": "A committed version (default: the latest).",
    "schema": {"type": "integer", "minimum": 0, "maximum": 10**18 - 1},
}

_ROUND = _path("number", "A round's number.", "^[0-9]{1,9}$")


def _query(name: str, description: str, minimum: int, maximum: int) -> dict[str, Any]:
    schema = {"type": "integer", "minimum": minimum, "maximum": maximum}
    return {"name": name, "in": "query", "description": description, "schema": schema}


_PAGE = (
    _query("offset", "Where the page starts (default 0).", 0, 10**9),
    _query("limit", "How many entries (default 1000).", 1, 10_000),
)
_DEVICES_PAGE = (
    _query("limit", "How many devices (default: every one).", 1, 10_000),
    {
        "name": "after",
        "in": "query",
        "description": "List the devices whose id sorts after this one (the last page's "
        "next_after).",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$"},
    },
)


@dataclass(frozen=True)
class Operation:
    """One call of the API: who may make it, what it takes, what it answers."""

    method: str
    path: str
    summary: str
    status: str
    """The success status."""
    answer: type[BaseModel] | str | None
    """The JSON body's model, another media type's name, or None for no body."""
    auth: Auth | None = None
    body: type[BaseModel] | str | None = None
    """The request body's model (JSON), or a media type's name."""
    body_required: bool = True
    errors: tuple[str, ...] = ()
    parameters: tuple[dict[str, Any], ...] = ()
    headers: tuple[tuple[str, str, dict[str, Any]], ...] = ()
    """Response headers of the success answer: (name, description, schema)."""
    link: tuple[str, str] | None = None
    """(path parameter, where the answer holds it): the answer links to every call taking it."""

    @property
    def operation_id(self) -> str:
        """Return the operation's id, from its method and path."""
        return f"{self.method}{self.path}".translate(str.maketrans("/", "_", "{}"))


_E = (_EXPERIMENT,)
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post",
        "/experiments",
        "Create an experiment from a config; its model becomes version 0",
        "201",
        c.Created,
        auth="admin",
        body=c.ExperimentConfigBody,
        link=("experiment_id", "$response.body#/id"),
    ),
    Operation("get", "/experiments", "List experiments", "200", c.ExperimentList, auth="viewer"),
    Operation(
        "get",
        "/experiments/{experiment_id}",
        "Show an experiment",
        "200",
        c.Experiment,
        auth="viewer",
        errors=("404",),
        parameters=_E,
    ),
    Operation(
        "delete",
        "/experiments/{experiment_id}",
        "Delete an experiment and its rounds (its model versions stay); 409 while a round "
        "is in flight",
        "204",
        None,
        auth="admin",
        errors=("404", "409"),
        parameters=_E,
    ),
    Operation(
        "post",
        "/experiments/{experiment_id}/pause",
        "Start no more queued rounds (the round in flight finishes)",
        "202",
        c.Experiment,
        auth="admin",
        errors=("404",),
        parameters=_E,
    ),
    Operation(
        "post",
        "/experiments/{experiment_id}/stop",
        "Abandon the round in flight and drop the queued rounds",
        "202",
        c.Experiment,
        auth="admin",
        errors=("404",),
        parameters=_E,
    ),
    Operation(
        "post",
        "/experiments/{experiment_id}/rounds",
        "Queue rounds; they run one after another",
        "202",
        c.Experiment,
        auth="admin",
        body=c.RoundsRequest,
        errors=("404",),
        parameters=_E,
        link=("experiment_id", "$response.body#/id"),
    ),
    Operation(
        "get",
        "/experiments/{experiment_id}/rounds",
        "List an experiment's rounds, with live progress for the one in flight",
        "200",
        c.RoundList,
        auth="viewer",
        errors=("404",),
        parameters=_E,
    ),
    Operation(
        "get",
        "/experiments/{experiment_id}/rounds/{number}/devices",
        "Page through a round's selected devices and accepted updates",
        "200",
        c.RoundDevices,
        auth="viewer",
        errors=("400", "404"),
        parameters=(_EXPERIMENT, _ROUND, *_PAGE),
    ),
    Operation(
        "get",
        "/experiments/{experiment_id}/model",
        "Download global weights (safetensors)",
        "200",
        "application/octet-stream",
        auth="viewer",
        errors=("400", "404"),
        parameters=(_EXPERIMENT, _VERSION),
        headers=(
            (
                "X-FedMQ-Model-Version",
                "The version sent.",
                {"type": "string", "pattern": "^[0-9]+$"},
            ),
        ),
    ),
    Operation("get", "/configs", "List the example configs", "200", c.ConfigList, auth="viewer"),
    Operation(
        "get",
        "/configs/{name}",
        "Show an example config, parsed and checked like a POSTed one",
        "200",
        c.ExampleConfig,
        auth="viewer",
        errors=("400", "404"),
        parameters=(_path("name", "An example config's name (its file name without suffix)."),),
    ),
    Operation(
        "post",
        "/devices",
        "Register a device (admin or enrollment token)",
        "201",
        c.Registered,
        auth="enrollment",
        body=c.Registration,
        errors=("409",),
        link=("device_id", "$response.body#/device_id"),
    ),
    Operation(
        "get",
        "/devices",
        "List devices (all, or a page), counted by state",
        "200",
        c.DeviceList,
        auth="viewer",
        errors=("400",),
        parameters=_DEVICES_PAGE,
    ),
    Operation(
        "post",
        "/devices/{device_id}/rotate",
        "Replace a device's key and token; the old key is refused from now on",
        "200",
        c.Registered,
        auth="admin",
        body=c.Rotation,
        body_required=False,
        errors=("404", "409"),
        parameters=(_DEVICE,),
    ),
    Operation(
        "delete",
        "/devices/{device_id}",
        "Revoke a device: its frames are refused and its broker user removed",
        "200",
        c.Revoked,
        auth="admin",
        errors=("404",),
        parameters=(_DEVICE,),
    ),
    Operation("get", "/health", "Liveness", "200", c.Health),
    Operation(
        "get",
        "/ready",
        "Readiness (also at /ready): 503 naming the failed checks",
        "200",
        c.Readiness,
        errors=("503",),
    ),
    Operation("get", "/openapi.json", "This document", "200", "application/json"),
    Operation(
        "get",
        "/blobs/{sha256}",
        "Download an artifact through a signed URL",
        "200",
        "application/octet-stream",
        auth="signed",
        errors=("403", "404"),
        parameters=(_path("sha256", "The blob's sha256.", "^[0-9a-f]{64}$"), *_SIGNED),
    ),
    Operation(
        "put",
        "/uploads/{nonce}",
        "Upload an update through a signed URL (one upload per URL; at most "
        "MAX_UPLOAD_BYTES, 1 GiB by default)",
        "201",
        c.Uploaded,
        auth="signed",
        body="application/octet-stream",
        errors=("400", "403", "409", "413"),
        parameters=(_path("nonce", "The upload's name, from the signed URL.", "^.+$"), *_SIGNED),
    ),
)
"""Every operation under ``/api/v1``."""


def _media(answer: type[BaseModel] | str) -> dict[str, Any]:
    if isinstance(answer, str):
        schema = {"type": "object"} if answer == "application/json" else {}
        return {answer: {"schema": schema} if schema else {}}
    return {"application/json": {"schema": {"$ref": _REF.format(model=answer.__name__)}}}


def _operation(op: Operation) -> dict[str, Any]:
    described = isinstance(op.answer, type) and op.answer.__doc__
    ok: dict[str, Any] = {"description": described or op.summary}
    if op.answer is not None:
        ok["content"] = _media(op.answer)
    if op.headers:
        ok["headers"] = {
            name: {"description": text, "schema": schema} for name, text, schema in op.headers
        }
    errors = set(op.errors)
    if op.auth in ("admin", "viewer", "enrollment"):
        errors.add("401")
    if isinstance(op.body, type):  # a JSON body: malformed is 400, above the limit 413
        errors |= {"400", "413"}
    responses = {op.status: ok}
    for code in sorted(errors):
        # An error has the error body; any other status (503 of /ready) the operation's own.
        known = code in _ERRORS
        responses[code] = (
            {"$ref": f"#/components/responses/{_ERRORS[code][0]}"}
            if known
            else {**ok, "description": f"{code}: {op.summary}"}
        )
    if op.link is not None:
        ok["links"] = _links(*op.link)
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "responses": responses,
    }
    if op.auth is not None:
        out["security"] = _SECURITY[op.auth]
    if op.parameters:
        out["parameters"] = list(op.parameters)
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required, "content": _media(op.body)}
    return out


def _links(parameter: str, expression: str) -> dict[str, Any]:
    """Return links from an answer to every operation whose path takes ``parameter``."""
    return {
        target.operation_id: {
            "operationId": target.operation_id,
            "parameters": {parameter: expression},
        }
        for target in OPERATIONS
        if any(p["name"] == parameter and p["in"] == "path" for p in target.parameters)
    }


def _schemas() -> dict[str, Any]:
    """Return every body's JSON Schema, keyed by model name (references between them resolve)."""
    models = [(m, "validation") for m in c.REQUESTS] + [(m, "serialization") for m in c.RESPONSES]
    _, defs = models_json_schema(models, ref_template=_REF)  # type: ignore[arg-type]
    schemas: dict[str, Any] = defs["$defs"]
    return schemas


@functools.cache
def _document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    paths["/metrics"] = {
        # Prometheus scrapes it at the root, as it expects, not under /api/v1.
        "servers": [{"url": "/"}],
        "get": {
            "operationId": "get_metrics",
            "summary": "The service's figures in the Prometheus text format",
            "responses": {"200": {"description": "metrics", "content": {"text/plain": {}}}},
        },
    }
    bearer = {"type": "http", "scheme": "bearer"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "FedMQ",
            "version": "1",
            "description": "Experiments, rounds, devices and model downloads of a FedMQ "
            'service. Every error is `{"error": {"code", "message"}}` with a 4xx status.',
        },
        "servers": [{"url": "/api/v1"}],
        "paths": paths,
        "components": {
            "schemas": _schemas(),
            "responses": {
                name: {
                    "description": text,
                    "content": _media(c.ErrorBody),
                    **(
                        {"headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}}
                        if code == "401"
                        else {}
                    ),
                }
                for code, (name, text) in _ERRORS.items()
            },
            "securitySchemes": {
                "admin": {**bearer, "description": "The admin token: every call."},
                "viewer": {**bearer, "description": "The read-only viewer token."},
                "enrollment": {**bearer, "description": "The token devices register with."},
            },
        },
    }


def document() -> dict[str, Any]:
    """Return the OpenAPI document (a copy: callers may change it freely)."""
    return copy.deepcopy(_document())
