"""Experiments and their rounds."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from aggregator_service.api.errors import (
    BadRequest,
    admin_required,
    json_body,
    path_id,
    viewer_required,
)
from aggregator_service.config import ExperimentConfig
from aggregator_service.errors import ConfigError
from aggregator_service.persistence import ExperimentRecord
from aggregator_service.rounds import RoundService, describe
from model_store import ModelSpecError

bp = Blueprint("experiments", __name__, url_prefix="/api/v1/experiments")


def _service() -> RoundService:
    service: RoundService = current_app.extensions["fedmq.rounds"]
    return service


def _describe(exp: ExperimentRecord) -> dict[str, Any]:
    return {
        "id": exp.id,
        "name": exp.name,
        "state": exp.state,
        "current_round": exp.current_round,
        "rounds_requested": exp.rounds_requested,
        "model_version": exp.model_version,
        "created_at": exp.created_at,
        "config": exp.config,
    }


@bp.post("")
@admin_required
def create() -> tuple[Response, int]:
    """Create an experiment from a config; publish its model as version 0."""
    config = ExperimentConfig.from_dict(json_body())
    try:
        experiment_id = _service().create_experiment(config)
    except ModelSpecError as exc:  # the zoo's own checks at build time (a negative seed)
        raise ConfigError(f"model: {exc}") from exc
    return jsonify({"id": experiment_id}), 201


@bp.get("")
@viewer_required
def list_all() -> Response:
    """List every experiment."""
    return jsonify({"experiments": [_describe(e) for e in _service().experiments()]})


@bp.get("/<experiment_id>")
@viewer_required
def show(experiment_id: str) -> Response:
    """Show one experiment's state, current round, model version and config."""
    return jsonify(_describe(_service().experiment(path_id(experiment_id, "experiment"))))


@bp.post("/<experiment_id>/rounds")
@admin_required
def start_rounds(experiment_id: str) -> tuple[Response, int]:
    """Queue rounds; they run one after another."""
    path_id(experiment_id, "experiment")
    body = json_body()
    if set(body) - {"count"}:
        raise BadRequest("the body takes one field, count")
    count = body.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 10_000:
        raise BadRequest("count must be an integer between 1 and 10000")
    _service().request_rounds(experiment_id, count)
    return jsonify(_describe(_service().experiment(experiment_id))), 202


@bp.get("/<experiment_id>/rounds")
@viewer_required
def list_rounds(experiment_id: str) -> Response:
    """List an experiment's rounds with their outcome and metrics."""
    rounds = _service().rounds(path_id(experiment_id, "experiment"))
    return jsonify({"rounds": [describe(r) for r in rounds]})
