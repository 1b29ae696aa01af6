"""Liveness and the OpenAPI document (the dashboard is ``dashboard.py``)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from aggregator_service.api.openapi import document

bp = Blueprint("meta", __name__)


@bp.get("/api/v1/health")
def health() -> Response:
    """Report that the service is up."""
    return jsonify({"status": "ok"})


@bp.get("/api/v1/openapi.json")
def openapi() -> Response:
    """Return the API's OpenAPI 3.1 document."""
    return jsonify(document())
