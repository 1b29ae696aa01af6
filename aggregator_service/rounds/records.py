"""Round records: the one created when a round is announced, its JSON view, and why none runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aggregator_service.persistence import RoundRecord
from broker import RoundOpened


def new_round_record(opened: RoundOpened, *, started_at: float) -> RoundRecord:
    """Return the record of a round that has just been announced."""
    return RoundRecord(
        experiment_id=opened.experiment_id,
        number=opened.round,
        state="training",
        base_version=opened.base_version,
        version=None,
        selected=opened.selected,
        reported=0,
        accepted=(),
        accepted_devices=(),
        rejected={},
        dropped=0,
        metrics={},
        reason=None,
        started_at=started_at,
        deadline_at=opened.deadline_at,
        ended_at=None,
    )


def describe(record: RoundRecord) -> dict[str, Any]:
    """Return a round record as the JSON the API and results files use."""
    return {
        "round": record.number,
        "state": record.state,
        "base_version": record.base_version,
        "version": record.version,
        "selected": len(record.selected),
        "selected_devices": list(record.selected),
        "reported": record.reported,
        "accepted": len(record.accepted),
        "accepted_updates": list(record.accepted),
        "rejected": dict(record.rejected),
        "dropped": record.dropped,
        "metrics": dict(record.metrics),
        "reason": record.reason,
        "started_at": record.started_at,
        "deadline_at": record.deadline_at,
        "ended_at": record.ended_at,
        "duration_s": record.duration_s,
    }


@dataclass(frozen=True)
class Waiting:
    """Why an experiment with rounds queued has none in flight."""

    online: int
    """Online devices it may select."""
    needed: int
    """Devices a round needs (its minimum of reports)."""
    grace_until: float | None = None
    """After a restart: when the service stops waiting for devices to check in again."""
