"""Signed blob downloads and update uploads, for devices of a local-folder store."""

from __future__ import annotations

import re

from flask import Blueprint, Response, current_app, jsonify, request
from flask.blueprints import BlueprintSetupState

from aggregator_service.api.errors import BadRequest
from aggregator_service.errors import NotFound, ServiceError
from aggregator_service.links import SignedLinks, UploadLedger
from model_store import ArtifactNotFound, ModelStore

bp = Blueprint("blobs", __name__, url_prefix="/api/v1")


_SHA256 = re.compile(r"[0-9a-f]{64}")


class PayloadTooLarge(ServiceError):
    """An upload above the service's size limit."""

    code = "payload_too_large"


@bp.record_once
def _build_ledger(state: BlueprintSetupState) -> None:
    """Give the app its upload ledger, over the store and signer ``create_app`` set."""
    extensions = state.app.extensions
    extensions["fedmq.uploads"] = UploadLedger(extensions["fedmq.store"], extensions["fedmq.links"])


def _links() -> SignedLinks:
    links: SignedLinks = current_app.extensions["fedmq.links"]
    return links


def _store() -> ModelStore:
    store: ModelStore = current_app.extensions["fedmq.store"]
    return store


def _verify(method: str) -> None:
    _links().verify(
        method, request.path, request.args.get("expires"), request.args.get("signature")
    )


@bp.get("/blobs/<sha256>")
def download(sha256: str) -> Response:
    """Return a blob's bytes (checksum-verified by the store on the way out)."""
    _verify("GET")
    if not _SHA256.fullmatch(sha256):  # the store refuses such names as a fault of its caller
        raise NotFound(f"no blob {sha256[:80]!r}")
    try:
        data = _store().get_blob(sha256)
    except ArtifactNotFound as exc:
        raise NotFound(str(exc)) from exc
    return Response(data, mimetype="application/octet-stream")


@bp.put("/uploads/<nonce>")
def upload(nonce: str) -> tuple[Response, int]:
    """Store an uploaded update once; answer with its sha256 for the device's claim check."""
    _verify("PUT")
    limit = int(current_app.config.get("MAX_UPLOAD_BYTES", 1 << 30))
    # The app-wide body limit is sized for JSON; this view reads up to its own.
    request.max_content_length = limit + 1
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"uploads are limited to {limit} bytes")
    ledger: UploadLedger = current_app.extensions["fedmq.uploads"]
    with ledger.once(nonce):
        # Read at most one byte past the limit: a chunked body has no length to check first.
        data = request.stream.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLarge(f"uploads are limited to {limit} bytes")
        if not data:
            raise BadRequest("empty upload (send the bytes as application/octet-stream)")
        sha256 = _store().put_blob(data)
    return jsonify({"sha256": sha256, "size": len(data)}), 201
