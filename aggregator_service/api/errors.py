"""Every error leaves the API as JSON ``{"error": {"code", "message"}}``; every bad input as a 4xx.

This module also holds the API's input boundary: bearer-token checks
(``admin_required``, ``viewer_required``), the bounded JSON body reader
(``json_body``) and the path-id check (``path_id``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Callable
from functools import wraps
from typing import Any, NoReturn, TypeVar, cast

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from aggregator_service.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    NotFound,
    ServiceError,
    Unauthorized,
)

MAX_BODY_BYTES = 1 << 20
"""Default ``MAX_CONTENT_LENGTH``: a JSON body above 1 MiB is refused with 413."""

MAX_FIELD_CHARS = 64 * 1024
"""Longest string ``json_body`` accepts anywhere in a body (an experiment config's names too)."""

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects ``json_body`` accepts."""

_CODES = {413: "payload_too_large"}
"""Error codes FedMQ names unlike werkzeug's reason phrase (RFC 9110 renamed 413)."""
_INT_LIMIT = 1 << 63
# Ids the service hands out are slugs plus hex; anything else cannot name a record,
# and keeping NUL, quotes and newlines out spares the database and response headers.
PATH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""What ``path_id`` lets through (the OpenAPI document's pattern for ids in paths)."""

F = TypeVar("F", bound=Callable[..., Any])


class BadRequest(ServiceError):
    """The request body or parameters are malformed."""

    code = "bad_request"


_STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    ConfigError: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
}


def error_response(code: str, message: str, status: int) -> tuple[Response, int]:
    """Return the JSON error body and status."""
    return jsonify({"error": {"code": code, "message": message}}), status


def register_error_handlers(app: Flask) -> None:
    """Translate service and HTTP errors into JSON responses, and bound request bodies."""
    # Flask's default is no limit; views that take more (uploads) raise it per request.
    if app.config.get("MAX_CONTENT_LENGTH") is None:
        app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError) -> tuple[Response, int]:
        # By isinstance, so a subclass another module adds keeps its parent's status.
        status = next((s for kind, s in _STATUS.items() if isinstance(exc, kind)), 500)
        if exc.code == "payload_too_large":
            status = 413
        if status == 500:
            current_app.logger.exception("internal error")
        response, status = error_response(exc.code, str(exc), status)
        if isinstance(exc, ConfigError):  # every problem of the config, not just the first
            body = response.get_json()
            body["error"]["problems"] = exc.problems
            response = jsonify(body)
        if status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="fedmq"'
        return response, status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = _CODES.get(exc.code or 0) or (exc.name or "error").lower().replace(" ", "_")
        return error_response(code, exc.description or "", exc.code or 500)


def _refuse(message: str) -> NoReturn:
    raise BadRequest(message)


def _parse_int(text: str) -> int:
    # The digit count is checked first: int() of 4,300+ digits raises, and 20 digits
    # already pass the 64-bit range every count, seed and size must fit in.
    value = int(text) if len(text) <= 20 else _INT_LIMIT
    if not -_INT_LIMIT <= value < _INT_LIMIT:
        _refuse(f"integers must fit in 64 bits, got {text[:24]}...")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        _refuse(f"numbers must be finite, got {text[:24]}")
    return value


def _parse_constant(text: str) -> NoReturn:
    _refuse(f"{text} is not JSON")


def _check_shape(body: Any) -> None:
    """Raise ``BadRequest`` for nesting deeper than ``MAX_DEPTH`` or strings above the limit."""
    stack: list[tuple[Any, int]] = [(body, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if len(value) > MAX_FIELD_CHARS:
                _refuse(f"strings are limited to {MAX_FIELD_CHARS} characters")
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                _refuse(f"JSON nesting is limited to {MAX_DEPTH} levels")
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


def json_body() -> dict[str, Any]:
    """Return the request's bounded JSON object or raise ``BadRequest``."""
    if not request.is_json:
        raise BadRequest("the request body must be a JSON object (Content-Type: application/json)")
    data = request.get_data(cache=True)  # over MAX_CONTENT_LENGTH: 413 from werkzeug
    try:
        body = json.loads(
            data,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
        )
    except RecursionError as exc:  # the C scanner's own guard against deep nesting
        raise BadRequest(f"JSON nesting is limited to {MAX_DEPTH} levels") from exc
    except ValueError as exc:  # syntax, encoding (UnicodeDecodeError is one)
        raise BadRequest(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _check_shape(body)
    return body


def query_int(name: str, low: int, high: int) -> int | None:
    """Return the query parameter ``name`` as an integer in ``[low, high]`` (None: not given).

    Raises ``BadRequest`` for anything but ASCII digits in that range.
    """
    raw = request.args.get(name)
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18 or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer between {low} and {high}")
    return int(raw)


def path_id(raw: str, what: str) -> str:
    """Return ``raw`` if it could name a record, else raise ``NotFound`` for ``what``."""
    if not PATH_ID.fullmatch(raw):
        raise NotFound(f"no such {what}: {raw[:64]!r}")
    return raw


def _bearer() -> bytes:
    """Return the request's bearer token (empty when there is none)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return b""
    return token.strip().encode("utf-8", "replace")


def _holds(given: bytes, *config_keys: str) -> bool:
    """Tell whether ``given`` is the token under one of ``config_keys`` (unset never matches)."""
    # Digests of equal length, compared in constant time: neither content nor length leaks.
    digest = hashlib.sha256(given).digest()
    found = False
    for key in config_keys:
        expected = str(current_app.config.get(key) or "")
        if expected:
            found |= hmac.compare_digest(digest, hashlib.sha256(expected.encode()).digest())
    return bool(given) and found


def _guard(view: F, keys: tuple[str, ...], who: str) -> F:
    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not _holds(_bearer(), *keys):
            raise Unauthorized(f"this call needs 'Authorization: Bearer <{who} token>'")
        return view(*args, **kwargs)

    return cast(F, wrapper)


def admin_required(view: F) -> F:
    """Refuse the call unless it carries ``Authorization: Bearer <admin token>``."""
    return _guard(view, ("ADMIN_TOKEN",), "admin")


def viewer_required(view: F) -> F:
    """Refuse the call unless it carries the viewer token (``VIEWER_TOKEN``) or the admin token."""
    return _guard(view, ("ADMIN_TOKEN", "VIEWER_TOKEN"), "viewer")
