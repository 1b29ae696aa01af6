"""Global model downloads."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from aggregator_service.api.errors import BadRequest
from aggregator_service.rounds import RoundService

bp = Blueprint("models", __name__, url_prefix="/api/v1/experiments")


@bp.get("/<experiment_id>/model")
def download(experiment_id: str) -> Response:
    """Return the global weights (safetensors), the latest or ``?version=v``."""
    raw = request.args.get("version")
    if raw is not None and not raw.isdigit():
        raise BadRequest("version must be a non-negative integer")
    service: RoundService = current_app.extensions["fedmq.rounds"]
    version, data = service.model_weights(experiment_id, None if raw is None else int(raw))
    response = Response(data, mimetype="application/octet-stream")
    response.headers["Content-Disposition"] = (
        f'attachment; filename="{experiment_id}-v{version}.safetensors"'
    )
    response.headers["X-FedMQ-Model-Version"] = str(version)
    return response
