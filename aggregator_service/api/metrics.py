"""``GET /metrics``: the service's state in Prometheus' text format (prometheus_client).

Everything is read from the service at scrape time (its database of rounds,
its device table, its refusal counts), so the figures are the round records
themselves, not a second tally that could drift from them. Worker intake is
``rate(fedmq_updates_accepted_total[1m])``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from flask import Blueprint, Response, current_app
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from aggregator_service.persistence import RoundSummary
from aggregator_service.rounds import RoundService

bp = Blueprint("metrics", __name__)

ROUND_STATES = ("training", "committed", "abandoned")
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
"""Upper bounds (seconds) of the round-duration histogram."""


@dataclass
class LinkCounters:
    """What the process counts about its broker link (it owns the transport)."""

    reconnects: int = 0

    def reconnected(self) -> None:
        """Count one reconnect (a transport's ``on_reconnect`` listener)."""
        self.reconnects += 1


class ServiceCollector(Collector):
    """Collects the coordinator's figures on each scrape."""

    def __init__(self, service: RoundService, link: LinkCounters | None = None) -> None:
        self._service = service
        self._link = link

    def collect(self) -> Iterator[Metric]:
        """Yield every metric family, computed from the service's current state."""
        service = self._service
        rounds = GaugeMetricFamily(
            "fedmq_rounds", "Rounds by experiment and state.", labels=["experiment", "state"]
        )
        accepted = CounterMetricFamily(
            "fedmq_updates_accepted",
            "Updates folded into the committed versions.",
            labels=["experiment"],
        )
        rejected = CounterMetricFamily(
            "fedmq_updates_rejected",
            "Updates and task refusals turned down in ended rounds, by reason.",
            labels=["experiment", "reason"],
        )
        durations = HistogramMetricFamily(
            "fedmq_round_duration_seconds",
            "Duration of ended rounds, from announcement to outcome.",
            labels=["experiment"],
        )
        epsilon = GaugeMetricFamily(
            "fedmq_privacy_epsilon",
            "Privacy spent so far (DP-FedAvg), as of the last committed round.",
            labels=["experiment"],
        )
        for exp in service.experiments():
            # Counts only: a scrape never reads a 1,000-device cohort's ids back.
            records = service.round_summaries(exp.id, max_ids=0)
            for state in ROUND_STATES:
                rounds.add_metric([exp.id, state], sum(r.state == state for r in records))
            ended = [r for r in records if r.state != "training"]
            committed = [r for r in ended if r.state == "committed"]
            accepted.add_metric([exp.id], sum(r.accepted for r in committed))
            for reason, count in sorted(_rejections(ended).items()):
                rejected.add_metric([exp.id, reason], count)
            buckets, total = _histogram(r.duration_s for r in ended if r.duration_s is not None)
            durations.add_metric([exp.id], buckets, total)
            spent = [r.metrics["epsilon"] for r in committed if "epsilon" in r.metrics]
            if spent:
                epsilon.add_metric([exp.id], spent[-1])
        yield from (rounds, accepted, rejected, durations, epsilon)
        yield _gauge("fedmq_devices_registered", "Devices registered.", service.registry.count())
        yield _gauge(
            "fedmq_devices_online",
            "Devices checked in and not gone.",
            len(service.online_devices()),
        )
        refused = CounterMetricFamily(
            "fedmq_refused_frames",
            "Frames refused on the bus, by component and reason.",
            labels=["component", "reason"],
        )
        for component, counts in sorted(service.refusal_counts().items()):
            for reason, count in sorted(counts.items()):
                refused.add_metric([component, reason], count)
        yield refused
        if self._link is not None:
            yield CounterMetricFamily(
                "fedmq_broker_reconnects",
                "Times the coordinator's broker connection was re-established.",
                value=self._link.reconnects,
            )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _rejections(records: Iterable[RoundSummary]) -> dict[str, int]:
    """Return the rejections of ``records`` added up by reason."""
    totals: dict[str, int] = {}
    for record in records:
        for reason, count in record.rejected.items():
            totals[reason] = totals.get(reason, 0) + int(count)
    return totals


def _histogram(values: Iterable[float]) -> tuple[list[tuple[str, float]], float]:
    """Return cumulative ``(le, count)`` buckets (``+Inf`` last) and the sum of ``values``."""
    seen = list(values)
    buckets = [(str(bound), float(sum(v <= bound for v in seen))) for bound in DURATION_BUCKETS]
    return [*buckets, ("+Inf", float(len(seen)))], float(sum(seen))


def metrics_registry(service: RoundService, link: LinkCounters | None = None) -> CollectorRegistry:
    """Return a registry of the service's own (no process-global default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service, link))
    return registry


@bp.get("/metrics")
def metrics() -> Response:
    """Return the service's figures in the Prometheus text format."""
    registry: CollectorRegistry | None = current_app.extensions.get("fedmq.metrics")
    if registry is None:
        service: RoundService = current_app.extensions["fedmq.rounds"]
        registry = metrics_registry(service, current_app.extensions.get("fedmq.link"))
        current_app.extensions["fedmq.metrics"] = registry
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
