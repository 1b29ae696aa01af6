"""``GET /metrics``: Prometheus text exposition of what the service counts.

Refused frames are counted by component (the coordinator, and each worker as
its latest outcome reported) and reason, so an operator sees forged,
unsigned or stale traffic on the bus without reading logs.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from aggregator_service.rounds import RoundService

bp = Blueprint("metrics", __name__)


def _label(value: str) -> str:
    """Return ``value`` escaped for a Prometheus label."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")[:128]


@bp.get("/metrics")
def metrics() -> Response:
    """Return the service's counters in the Prometheus text format."""
    service: RoundService = current_app.extensions["fedmq.rounds"]
    lines = [
        "# HELP fedmq_refused_frames_total Frames refused on the bus, by component and reason.",
        "# TYPE fedmq_refused_frames_total counter",
    ]
    for component, counts in sorted(service.refusal_counts().items()):
        for reason, count in sorted(counts.items()):
            lines.append(
                f'fedmq_refused_frames_total{{component="{_label(component)}",'
                f'reason="{_label(reason)}"}} {int(count)}'
            )
    lines += [
        "# HELP fedmq_devices_registered Devices registered with the service.",
        "# TYPE fedmq_devices_registered gauge",
        f"fedmq_devices_registered {service.registry.count()}",
    ]
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")
