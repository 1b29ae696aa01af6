"""The REST API's OpenAPI 3 document (kept next to the blueprints it describes)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/responses/Error"}
_JSON = {"application/json": {"schema": {"type": "object"}}}


# Who may call: the admin token, or either token (the admin one opens every read).
_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "admin": [{"admin": []}],
    "viewer": [{"viewer": []}, {"admin": []}],
}
# A signed URL is its own credential: expiry and HMAC in the query.
_SIGNED = [
    {"name": name, "in": "query", "required": True, "schema": {"type": "string", "pattern": p}}
    for name, p in (("expires", "^[0-9]{1,12}$"), ("signature", "^[0-9a-f]{64}$"))
]


def _op(
    summary: str,
    ok: str,
    *,
    auth: str | None = None,
    body: bool = False,
    errors: tuple[str, ...] = (),
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            ok: {"description": "success", "content": _JSON},
            **{code: _ERROR for code in errors},
        },
    }
    if auth is not None:
        op["security"] = _SECURITY[auth]
        op["responses"]["401"] = _ERROR
    if body:
        op["requestBody"] = {"required": True, "content": _JSON}
        op["responses"]["413"] = _ERROR
    return op


_VERSION = {"type": "integer", "minimum": 0, "maximum": 10**18 - 1}
_ID = [{"name": "experiment_id", "in": "path", "required": True, "schema": {"type": "string"}}]

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "FedMQ", "version": "1"},
    "servers": [{"url": "/api/v1"}],
    "paths": {
        "/experiments": {
            "post": _op("Create an experiment", "201", auth="admin", body=True, errors=("400",)),
            "get": _op("List experiments", "200", auth="viewer"),
        },
        "/experiments/{experiment_id}": {
            "parameters": _ID,
            "get": _op("Show an experiment", "200", auth="viewer", errors=("404",)),
            "delete": {
                "summary": "Delete an experiment and its rounds (its model versions stay)",
                "security": _SECURITY["admin"],
                "responses": {
                    "204": {"description": "deleted"},
                    "401": _ERROR,
                    "404": _ERROR,
                    "409": _ERROR,
                },
            },
        },
        "/experiments/{experiment_id}/pause": {
            "parameters": _ID,
            "post": _op(
                "Start no more queued rounds (the round in flight finishes)",
                "202",
                auth="admin",
                errors=("404",),
            ),
        },
        "/experiments/{experiment_id}/stop": {
            "parameters": _ID,
            "post": _op(
                "Abandon the round in flight and drop the queued rounds",
                "202",
                auth="admin",
                errors=("404",),
            ),
        },
        "/experiments/{experiment_id}/rounds": {
            "parameters": _ID,
            "post": _op("Queue rounds", "202", auth="admin", body=True, errors=("400", "404")),
            "get": _op("List rounds", "200", auth="viewer", errors=("404",)),
        },
        "/experiments/{experiment_id}/model": {
            "parameters": _ID + [{"name": "version", "in": "query", "schema": _VERSION}],
            "get": {
                "summary": "Download global weights (safetensors)",
                "security": _SECURITY["viewer"],
                "responses": {
                    "200": {"description": "weights", "content": {"application/octet-stream": {}}},
                    "400": _ERROR,
                    "401": _ERROR,
                    "404": _ERROR,
                },
            },
        },
        "/configs": {"get": _op("List the example configs", "200", auth="viewer")},
        "/configs/{name}": {
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": _op("Show an example config", "200", auth="viewer", errors=("400", "404")),
        },
        "/devices": {
            "post": _op("Register a device", "201", auth="admin", body=True, errors=("400",)),
            "get": _op("List devices", "200", auth="viewer"),
        },
        "/health": {"get": _op("Liveness", "200")},
        "/blobs/{sha256}": {
            "get": {
                "summary": "Download an artifact through a signed URL",
                "parameters": _SIGNED,
                "responses": {
                    "200": {"description": "bytes", "content": {"application/octet-stream": {}}},
                    "403": _ERROR,
                    "404": _ERROR,
                },
            },
        },
        "/uploads/{nonce}": {
            "put": {
                "summary": "Upload an update through a signed URL (one upload per URL)",
                "parameters": _SIGNED,
                "requestBody": {
                    "required": True,
                    "content": {"application/octet-stream": {}},
                },
                "responses": {
                    "201": {"description": "stored", "content": _JSON},
                    "400": _ERROR,
                    "403": _ERROR,
                    "409": _ERROR,
                    "413": _ERROR,
                },
            },
        },
        "/openapi.json": {"get": _op("This document", "200")},
    },
    "components": {
        "securitySchemes": {
            "admin": {"type": "http", "scheme": "bearer", "description": "the admin token"},
            "viewer": {
                "type": "http",
                "scheme": "bearer",
                "description": "the read-only viewer token",
            },
        },
        "responses": {
            "Error": {
                "description": "error",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "error": {
                                    "type": "object",
                                    "properties": {
                                        "code": {"type": "string"},
                                        "message": {"type": "string"},
                                    },
                                }
                            },
                        }
                    }
                },
            }
        },
    },
}
