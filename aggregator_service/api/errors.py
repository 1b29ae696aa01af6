"""Every error leaves the API as JSON ``{"error": {"code", "message"}}`` with a 4xx/5xx status."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast

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

_STATUS: dict[type[ServiceError], int] = {
    ConfigError: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
}

F = TypeVar("F", bound=Callable[..., Any])


class BadRequest(ServiceError):
    """The request body or parameters are malformed."""

    code = "bad_request"


def error_response(code: str, message: str, status: int) -> tuple[Response, int]:
    """Return the JSON error body and status."""
    return jsonify({"error": {"code": code, "message": message}}), status


def register_error_handlers(app: Flask) -> None:
    """Translate service and HTTP errors into JSON responses."""

    @app.errorhandler(ServiceError)
    def _service_error(exc: ServiceError) -> tuple[Response, int]:
        status = _STATUS.get(type(exc), 500)
        if isinstance(exc, BadRequest):
            status = 400
        elif exc.code == "payload_too_large":
            status = 413
        if status == 500:
            current_app.logger.exception("internal error")
        return error_response(exc.code, str(exc), status)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        code = (exc.name or "error").lower().replace(" ", "_")
        return error_response(code, exc.description or "", exc.code or 500)


def json_body() -> dict[str, Any]:
    """Return the request's JSON object or raise ``BadRequest``."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def admin_required(view: F) -> F:
    """Refuse the call unless it carries ``Authorization: Bearer <admin token>``."""

    @wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        expected = str(current_app.config["ADMIN_TOKEN"])
        header = request.headers.get("Authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized("this call needs 'Authorization: Bearer <admin token>'")
        return view(*args, **kwargs)

    return cast(F, wrapper)
