"""Round records: the one created when a round is announced, its JSON views, and why none runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aggregator_service.persistence import RoundRecord, RoundSummary
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


MAX_INLINE_IDS = 100
"""The longest list of ids a round's JSON carries inline; longer ones are paged."""


def summarize(record: RoundRecord, *, max_ids: int | None = None) -> RoundSummary:
    """Return a round record's summary, its lists of ids kept only if at most ``max_ids``."""

    def short(ids: tuple[str, ...]) -> tuple[str, ...] | None:
        return ids if max_ids is None or len(ids) <= max_ids else None

    return RoundSummary(
        experiment_id=record.experiment_id,
        number=record.number,
        state=record.state,
        base_version=record.base_version,
        version=record.version,
        selected=len(record.selected),
        reported=record.reported,
        accepted=len(record.accepted),
        rejected=record.rejected,
        dropped=record.dropped,
        metrics=record.metrics,
        reason=record.reason,
        started_at=record.started_at,
        deadline_at=record.deadline_at,
        ended_at=record.ended_at,
        selected_devices=short(record.selected),
        accepted_updates=short(record.accepted),
    )


def describe(record: RoundRecord | RoundSummary, *, max_ids: int | None = None) -> dict[str, Any]:
    """Return a round as the JSON the API and results files use.

    ``selected_devices`` and ``accepted_updates`` list ids only where at most
    ``max_ids`` of them (None: always); a longer list is ``null``, and
    ``selected`` and ``accepted`` count it.
    """
    summary = record if isinstance(record, RoundSummary) else summarize(record, max_ids=max_ids)
    ids, updates = summary.selected_devices, summary.accepted_updates
    return {
        "round": summary.number,
        "state": summary.state,
        "base_version": summary.base_version,
        "version": summary.version,
        "selected": summary.selected,
        "selected_devices": None if ids is None else list(ids),
        "reported": summary.reported,
        "accepted": summary.accepted,
        "accepted_updates": None if updates is None else list(updates),
        "rejected": dict(summary.rejected),
        "dropped": summary.dropped,
        "metrics": dict(summary.metrics),
        "reason": summary.reason,
        "started_at": summary.started_at,
        "deadline_at": summary.deadline_at,
        "ended_at": summary.ended_at,
        "duration_s": summary.duration_s,
    }


@dataclass(frozen=True)
class RoundDevices:
    """A page of a round's selected devices (each with whether its update was accepted).

    The same page of the round's accepted updates' ids rides along, so one
    walk through the pages reads both lists.
    """

    round: int
    selected: int
    """How many devices the round selected."""
    accepted: int
    """How many updates the round accepted (in flight: how many so far)."""
    offset: int
    devices: list[tuple[str, bool]]
    """Selected devices in the round's order, each with whether its update was accepted."""
    accepted_updates: list[str]
    """Accepted updates' ids, the same slice of that list."""
    next_offset: int | None
    """Where the next page starts (None: this is the last)."""

    @classmethod
    def page(
        cls, record: RoundRecord, accepted: set[str], *, offset: int, limit: int
    ) -> RoundDevices:
        """Return the page of ``limit`` entries from ``offset`` of a round's lists."""
        end = offset + limit
        longest = max(len(record.selected), len(record.accepted))
        return cls(
            round=record.number,
            selected=len(record.selected),
            accepted=len(record.accepted) if record.state != "training" else len(accepted),
            offset=offset,
            devices=[(d, d in accepted) for d in record.selected[offset:end]],
            accepted_updates=list(record.accepted[offset:end]),
            next_offset=end if end < longest else None,
        )


@dataclass(frozen=True)
class Waiting:
    """Why an experiment with rounds queued has none in flight."""

    online: int
    """Online devices it may select."""
    needed: int
    """Devices a round needs (its minimum of reports)."""
    grace_until: float | None = None
    """After a restart: when the service stops waiting for devices to check in again."""
