"""The Flask application factory: the service's composition root for HTTP."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

from flask import Flask

from aggregator_service.api import (
    blobs,
    configs,
    dashboard,
    devices,
    experiments,
    meta,
    metrics,
    models,
    readiness,
)
from aggregator_service.api.errors import register_error_handlers
from aggregator_service.links import SignedLinks
from aggregator_service.rounds import RoundService
from model_store import ModelStore

log = logging.getLogger(__name__)


def create_app(
    config: Mapping[str, Any] | None = None,
    *,
    service: RoundService,
    store: ModelStore | None = None,
    links: SignedLinks | None = None,
) -> Flask:
    """Build the Flask app around a running ``RoundService``.

    Parameters
    ----------
    config
        Flask settings; ``ADMIN_TOKEN`` guards state-changing calls and
        ``VIEWER_TOKEN`` (optional) opens the reads that reveal devices,
        cohorts, configs or weights, which the admin token opens too. Unset,
        they come from ``FEDMQ_ADMIN_TOKEN`` and ``FEDMQ_VIEWER_TOKEN``.
        ``CONFIGS_DIR`` (``FEDMQ_CONFIGS_DIR``) holds the example configs the
        dashboard offers (default: the ``experiments/configs`` shipped beside
        the packages).
    service
        The round coordinator the views call. Without an admin token a random
        one nobody knows is set, so state-changing calls are refused.
    store, links
        With both, the app serves signed blob downloads and update uploads
        (``/api/v1/blobs``, ``/api/v1/uploads``) for a local-folder store.

    Returns
    -------
    Flask
        The application, with the API under ``/api/v1`` and the dashboard at ``/``.
    """
    app = Flask(__name__, static_folder=None)  # the dashboard serves its own files, by name
    if config:
        app.config.update(config)
    if not app.config.get("ADMIN_TOKEN"):
        app.config["ADMIN_TOKEN"] = secrets.token_urlsafe(24)
        log.warning(
            "no admin token configured: state-changing calls are refused, and guarded reads "
            "without a viewer token (set FEDMQ_ADMIN_TOKEN, FEDMQ_VIEWER_TOKEN)"
        )
    # No viewer token: only the admin token opens the guarded reads.
    app.config["VIEWER_TOKEN"] = str(app.config.get("VIEWER_TOKEN") or "")
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["fedmq.rounds"] = service
    for blueprint in (
        experiments.bp,
        models.bp,
        devices.bp,
        configs.bp,
        meta.bp,
        metrics.bp,
        readiness.bp,
        dashboard.bp,
    ):
        app.register_blueprint(blueprint)
    if store is not None and links is not None:
        app.extensions["fedmq.store"] = store
        app.extensions["fedmq.links"] = links
        app.register_blueprint(blobs.bp)
    register_error_handlers(app)
    return app
