"""Liveness, the OpenAPI document, and the dashboard page."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, render_template_string

from aggregator_service.api.openapi import OPENAPI
from aggregator_service.rounds import RoundService

bp = Blueprint("meta", __name__)


@bp.get("/api/v1/health")
def health() -> Response:
    """Report that the service is up."""
    return jsonify({"status": "ok"})


@bp.get("/api/v1/openapi.json")
def openapi() -> Response:
    """Return the API's OpenAPI 3 document."""
    return jsonify(OPENAPI)


_DASHBOARD = """<!doctype html>
<html><head><meta charset="utf-8"><title>FedMQ</title>
<meta http-equiv="refresh" content="5">
<style>body{font:14px system-ui;margin:2em}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#eee}</style>
</head><body><h1>FedMQ</h1>
{% for exp, rounds in experiments %}
<h2>{{ exp.name }}
<small>{{ exp.id }} &middot; {{ exp.state }} &middot; v{{ exp.model_version }}</small></h2>
<table><tr><th>round</th><th>state</th><th>selected</th><th>reported</th><th>accepted</th>
<th>loss</th><th>accuracy</th><th>seconds</th></tr>
{% for r in rounds %}<tr><td>{{ r.number }}</td><td>{{ r.state }}</td>
<td>{{ r.selected|length }}</td>
<td>{{ r.reported }}</td><td>{{ r.accepted|length }}</td>
<td>{{ "%.4f"|format(r.metrics.get("loss", 0)) }}</td>
<td>{{ "%.4f"|format(r.metrics.get("accuracy", 0)) }}</td>
<td>{{ "%.2f"|format(r.duration_s or 0) }}</td></tr>{% endfor %}
</table>{% else %}<p>No experiments yet.</p>{% endfor %}
</body></html>"""


@bp.get("/")
def dashboard() -> str:
    """Render every experiment's rounds as a self-refreshing page."""
    service: RoundService = current_app.extensions["fedmq.rounds"]
    experiments: list[tuple[Any, Any]] = [
        (exp, service.rounds(exp.id)) for exp in service.experiments()
    ]
    return render_template_string(_DASHBOARD, experiments=experiments)
