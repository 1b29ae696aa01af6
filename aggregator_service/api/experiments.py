"""Experiments and their rounds: create, show, queue, pause, stop, delete, and live progress."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from aggregator_service.api.errors import (
    BadRequest,
    admin_required,
    json_body,
    path_id,
    query_int,
    viewer_required,
)
from aggregator_service.config import ExperimentConfig, check_model_size
from aggregator_service.errors import ConfigError, NotFound
from aggregator_service.persistence import ExperimentRecord, RoundSummary
from aggregator_service.rounds import RoundService, describe
from aggregator_service.rounds.records import MAX_INLINE_IDS
from model_store import ModelSpecError

bp = Blueprint("experiments", __name__, url_prefix="/api/v1/experiments")


def _service() -> RoundService:
    service: RoundService = current_app.extensions["fedmq.rounds"]
    return service


def _describe(exp: ExperimentRecord) -> dict[str, Any]:
    waiting = _service().waiting(exp)
    return {
        "id": exp.id,
        "name": exp.name,
        "state": exp.state,
        "current_round": exp.current_round,
        "rounds_requested": exp.rounds_requested,
        "model_version": exp.model_version,
        "created_at": exp.created_at,
        "config": exp.config,
        "waiting": None if waiting is None else dataclasses.asdict(waiting),
    }


MAX_PAGE = 10_000
"""The most entries one page of a round's devices holds (``limit``)."""

_ROUND = re.compile(r"[0-9]{1,9}")


def _describe_round(record: RoundSummary) -> dict[str, Any]:
    """Return a round's JSON; one still training adds what the coordinator knows so far."""
    described = describe(record)
    if record.state == "training":
        status = _service().round_status(record.experiment_id, record.number)
        described["progress"] = None
        if status is not None:
            described["progress"] = {
                "phase": status.phase.value,
                "reported": status.reported,
                "accepted": status.accepted,
                "target": status.target,
                "minimum": status.minimum,
                "deadline_at": status.deadline_at,
                "remaining_s": status.remaining_s,  # a browser's clock need not be ours
            }
    return described


@bp.post("")
@admin_required
def create() -> tuple[Response, int]:
    """Create an experiment from a config; publish its model as version 0."""
    config = ExperimentConfig.from_dict(json_body())
    check_model_size(config, current_app.config.get("MAX_MODEL_PARAMETERS"))
    try:
        experiment_id = _service().create_experiment(config)
    except ModelSpecError as exc:  # the zoo's own checks at build time
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


@bp.post("/<experiment_id>/pause")
@admin_required
def pause(experiment_id: str) -> tuple[Response, int]:
    """Start no more queued rounds; the round in flight finishes."""
    _service().stop_after_current_round(path_id(experiment_id, "experiment"))
    return jsonify(_describe(_service().experiment(experiment_id))), 202


@bp.post("/<experiment_id>/stop")
@admin_required
def stop(experiment_id: str) -> tuple[Response, int]:
    """Abandon the round in flight now and drop the rounds queued."""
    _service().stop(path_id(experiment_id, "experiment"))
    return jsonify(_describe(_service().experiment(experiment_id))), 202


@bp.delete("/<experiment_id>")
@admin_required
def delete(experiment_id: str) -> tuple[str, int]:
    """Remove an experiment without a round in flight, and its rounds; 409 otherwise."""
    _service().delete_experiment(path_id(experiment_id, "experiment"))
    return "", 204


@bp.get("/<experiment_id>/rounds")
@viewer_required
def list_rounds(experiment_id: str) -> Response:
    """List an experiment's rounds with their outcome and metrics (live progress in flight).

    A round's ``selected_devices`` and ``accepted_updates`` are listed up to
    ``MAX_INLINE_IDS`` ids; a longer list is null, paged at ``/rounds/<n>/devices``.
    """
    rounds = _service().round_summaries(
        path_id(experiment_id, "experiment"), max_ids=MAX_INLINE_IDS
    )
    return jsonify({"rounds": [_describe_round(r) for r in rounds]})


@bp.get("/<experiment_id>/rounds/<number>/devices")
@viewer_required
def round_devices(experiment_id: str, number: str) -> Response:
    """Page through a round's selected devices (with whether each was accepted) and updates."""
    path_id(experiment_id, "experiment")
    if not _ROUND.fullmatch(number):
        raise NotFound(f"no such round: {number[:24]!r}")
    offset = query_int("offset", 0, 10**9) or 0
    limit = query_int("limit", 1, MAX_PAGE) or 1_000
    page = _service().round_devices(experiment_id, int(number), offset=offset, limit=limit)
    return jsonify(
        {
            "round": page.round,
            "selected": page.selected,
            "accepted": page.accepted,
            "offset": page.offset,
            "next_offset": page.next_offset,
            "devices": [{"id": d, "accepted": ok} for d, ok in page.devices],
            "accepted_updates": page.accepted_updates,
        }
    )
