"""Device registration and listing."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify

from aggregator_service.api.errors import BadRequest, admin_required, json_body
from aggregator_service.rounds import RoundService

bp = Blueprint("devices", __name__, url_prefix="/api/v1/devices")

PLATFORMS = ("android", "ios", "python", "emulated")


def _service() -> RoundService:
    service: RoundService = current_app.extensions["fedmq.rounds"]
    return service


@bp.post("")
@admin_required
def register() -> tuple[Response, int]:
    """Register a device; the token is shown once and stored only as a hash."""
    platform = json_body().get("platform")
    if platform not in PLATFORMS:
        raise BadRequest(f"platform must be one of {', '.join(PLATFORMS)}")
    device_id, token = _service().register_device(str(platform))
    return jsonify({"device_id": device_id, "token": token}), 201


@bp.get("")
def list_all() -> Response:
    """List known devices with platform, last check-in and rounds served."""
    return jsonify(
        {
            "devices": [
                {
                    "id": d.id,
                    "platform": d.platform,
                    "registered_at": d.registered_at,
                    "last_seen": d.last_seen,
                    "rounds_served": d.rounds_served,
                }
                for d in _service().devices()
            ]
        }
    )
