"""``GET /ready``: whether this service can run rounds now (``/api/v1/health`` is liveness).

Ready means: its database answers, its broker accepts connections, and an
aggregator worker has said it is alive lately. Orchestrators and load
balancers route to a ready service only; the body says which check failed.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Response, current_app, jsonify

from aggregator_service.rounds import RoundService

bp = Blueprint("readiness", __name__)

WORKER_SILENCE_S = 45.0
"""A worker not heard from for this long (three of its beats) no longer counts."""


@bp.get("/ready")
@bp.get("/api/v1/ready")
def ready() -> tuple[Response, int]:
    """Return 200 with each check when ready, else 503 naming what is missing."""
    service: RoundService = current_app.extensions["fedmq.rounds"]
    broker_up: Callable[[], bool] = current_app.extensions.get("fedmq.broker_probe", _unknown)
    now = service.clock()
    heard = [w for w, at in service.workers_heard().items() if now - at <= WORKER_SILENCE_S]
    checks = {
        "database": _check(service.database_reachable(), "answers", "does not answer"),
        "broker": _check(broker_up(), "accepts connections", "refuses or does not answer"),
        "workers": _check(
            bool(heard),
            f"{len(heard)} heard from in the last {WORKER_SILENCE_S:.0f} s",
            f"none heard from in the last {WORKER_SILENCE_S:.0f} s",
        ),
    }
    ok = all(check["ok"] for check in checks.values())
    return jsonify({"ready": ok, "checks": checks}), 200 if ok else 503


def _check(ok: bool, good: str, bad: str) -> dict[str, object]:
    return {"ok": ok, "detail": good if ok else bad}


def _unknown() -> bool:
    """Without a probe (an in-process service) the bus is the process's own: it is up."""
    return True
