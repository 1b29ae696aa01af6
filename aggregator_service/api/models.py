"""Global model downloads."""

from __future__ import annotations

import re

from flask import Blueprint, Response, current_app, request

from aggregator_service.api.errors import BadRequest, path_id, viewer_required
from aggregator_service.rounds import RoundService

bp = Blueprint("models", __name__, url_prefix="/api/v1/experiments")

# ASCII digits only (str.isdigit also takes '²', which int() refuses), and few
# enough that the version fits the database's 64-bit integers.
_VERSION = re.compile(r"[0-9]{1,18}")


@bp.get("/<experiment_id>/model")
@viewer_required
def download(experiment_id: str) -> Response:
    """Return the global weights (safetensors), the latest or ``?version=v``."""
    path_id(experiment_id, "experiment")
    raw = request.args.get("version")
    if raw is not None and not _VERSION.fullmatch(raw):
        raise BadRequest("version must be a non-negative integer of at most 18 digits")
    service: RoundService = current_app.extensions["fedmq.rounds"]
    version, data = service.model_weights(experiment_id, None if raw is None else int(raw))
    response = Response(data, mimetype="application/octet-stream")
    response.headers["Content-Disposition"] = (
        f'attachment; filename="{experiment_id}-v{version}.safetensors"'
    )
    response.headers["X-FedMQ-Model-Version"] = str(version)
    return response
