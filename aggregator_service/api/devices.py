"""Device identities: registration (admin or enrollment token), listing, rotation, revocation."""

from __future__ import annotations

import enum
import hmac
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from aggregator_service.api.errors import (
    BadRequest,
    admin_required,
    json_body,
    query_int,
    viewer_required,
)
from aggregator_service.errors import Unauthorized
from aggregator_service.persistence import DeviceRecord
from aggregator_service.rounds import RoundService
from aggregator_service.rounds.registry import PLATFORMS, Registration
from broker import topics
from broker.identity import encode_key

bp = Blueprint("devices", __name__, url_prefix="/api/v1/devices")

MAX_PAGE = 10_000
"""The most devices one page holds (``limit``)."""


class DeviceState(enum.Enum):
    """A device as an operator sees it: revoked, or whether it is checked in now."""

    REVOKED = "revoked"
    ONLINE = "online"
    OFFLINE = "offline"


def _service() -> RoundService:
    service: RoundService = current_app.extensions["fedmq.rounds"]
    return service


def _enrollment_allowed() -> None:
    """Refuse the call unless it carries the admin token or the enrollment token."""
    header = request.headers.get("Authorization", "")
    given = header.removeprefix("Bearer ").strip().encode() if header.startswith("Bearer ") else b""
    for key in ("ADMIN_TOKEN", "ENROLLMENT_TOKEN"):
        expected = str(current_app.config.get(key) or "").encode()
        if given and expected and hmac.compare_digest(given, expected):
            return
    raise Unauthorized("registering a device needs 'Authorization: Bearer <enrollment token>'")


def _text(body: dict[str, Any], key: str, limit: int) -> str | None:
    """Return an optional string field of at most ``limit`` characters."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise BadRequest(f"{key} must be a string of 1-{limit} characters")
    return value


def _registered(registration: Registration, status: int) -> tuple[Response, int]:
    """Return what a device is told once: its id, token, keys and broker credentials."""
    body: dict[str, Any] = {
        "device_id": registration.device_id,
        "token": registration.token,
        "public_key": registration.public_key,
        "service_key": encode_key(_service().public_key),
        "namespace": current_app.config.get("NAMESPACE", "fedmq"),
    }
    if registration.private_key is not None:
        body["private_key"] = registration.private_key
    if registration.broker is not None:
        body["broker"] = {
            "username": registration.broker.username,
            "password": registration.broker.password,
        }
    return jsonify(body), status


@bp.post("")
def register() -> tuple[Response, int]:
    """Register a device: its public key (or a pair made here), its id, its broker user."""
    _enrollment_allowed()
    body = json_body()
    platform = body.get("platform")
    if platform not in PLATFORMS:
        raise BadRequest(f"platform must be one of {', '.join(PLATFORMS)}")
    registration = _service().register_device(
        str(platform),
        public_key=_text(body, "public_key", 128),
        device_id=_text(body, "device_id", 128),
    )
    return _registered(registration, 201)


@bp.post("/<device_id>/rotate")
@admin_required
def rotate(device_id: str) -> tuple[Response, int]:
    """Replace a device's key and token; the old key is refused from now on."""
    body = json_body() if request.data else {}
    registration = _service().registry.rotate(device_id, _text(body, "public_key", 128))
    return _registered(registration, 200)


@bp.delete("/<device_id>")
@admin_required
def revoke(device_id: str) -> tuple[Response, int]:
    """Revoke a device: its frames are refused and its broker user removed."""
    _service().revoke_device(device_id)
    return jsonify({"device_id": device_id, "revoked": True}), 200


@bp.get("")
@viewer_required
def list_all() -> Response:
    """List known devices with platform, state, last check-in, rounds served and revocation.

    By id: every device, or with ``?limit=n`` the first ``n`` (after ``?after=id``),
    ``next_after`` naming where the next page starts. ``counts`` counts them all by state.
    """
    after = request.args.get("after")
    if after is not None and not topics.is_valid_segment(after):
        raise BadRequest("after must be a device id")
    limit = query_int("limit", 1, MAX_PAGE)
    service = _service()
    online = service.online_devices()
    records = service.devices(after=after, limit=None if limit is None else limit + 1)
    next_after = None
    if limit is not None and len(records) > limit:
        records = records[:limit]
        next_after = records[-1].id
    return jsonify(
        {
            "devices": [
                {
                    "id": d.id,
                    "platform": d.platform,
                    "state": _state(d, online).value,
                    "registered_at": d.registered_at,
                    "last_seen": d.last_seen,
                    "rounds_served": d.rounds_served,
                    "public_key": d.public_key,
                    "revoked": d.revoked_at is not None,
                }
                for d in records
            ],
            "counts": service.device_counts(),
            "next_after": next_after,
        }
    )


def _state(device: DeviceRecord, online: frozenset[str]) -> DeviceState:
    """Return a device's state; online means checked in and not gone since."""
    if device.revoked_at is not None:
        return DeviceState.REVOKED
    return DeviceState.ONLINE if device.id in online else DeviceState.OFFLINE
