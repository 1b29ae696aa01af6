"""Frozen records the database hands out, so no SQL session leaks past it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExperimentRecord:
    """One experiment's stored state."""

    id: str
    name: str
    config: Mapping[str, Any]
    state: str
    model_version: int
    current_round: int
    rounds_requested: int
    created_at: float


@dataclass(frozen=True)
class RoundRecord:
    """One round's stored outcome."""

    experiment_id: str
    number: int
    state: str
    base_version: int
    version: int | None
    selected: tuple[str, ...]
    reported: int
    accepted: tuple[str, ...]
    accepted_devices: tuple[str, ...]
    rejected: Mapping[str, int]
    dropped: int
    metrics: Mapping[str, float]
    reason: str | None
    started_at: float
    deadline_at: float
    ended_at: float | None

    @property
    def duration_s(self) -> float | None:
        """Return the round's wall time, once it has ended."""
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass(frozen=True)
class RoundSummary:
    """One round's outcome with its counts, its lists of ids only where they are short."""

    experiment_id: str
    number: int
    state: str
    base_version: int
    version: int | None
    selected: int
    reported: int
    accepted: int
    rejected: Mapping[str, int]
    dropped: int
    metrics: Mapping[str, float]
    reason: str | None
    started_at: float
    deadline_at: float
    ended_at: float | None
    selected_devices: tuple[str, ...] | None
    """The selected devices' ids, or None where the list was left out for its length."""
    accepted_updates: tuple[str, ...] | None
    """The accepted updates' ids, or None where the list was left out for its length."""

    @property
    def duration_s(self) -> float | None:
        """Return the round's wall time, once it has ended."""
        return None if self.ended_at is None else self.ended_at - self.started_at


@dataclass(frozen=True)
class DeviceRecord:
    """One known device."""

    id: str
    platform: str
    registered_at: float
    last_seen: float | None
    rounds_served: int
    public_key: str | None = None
    """The device's Ed25519 public key, base64 (None: registered before identities)."""
    revoked_at: float | None = None
