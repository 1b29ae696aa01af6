"""FedBuff (Nguyen et al. 2022): asynchronous buffered aggregation of staleness-weighted deltas."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aggregator_service.strategies import _checks
from aggregator_service.strategies.base import StateValue, Strategy
from aggregator_service.strategies.ops import SummedState, WeightedSum, check_keys, step_from
from aggregator_service.types import ClientUpdate, Scalar, Weights


class StaleUpdate(ValueError):
    """An update trained on a model more than ``max_staleness`` versions old."""


@dataclass
class BufferState(SummedState):
    """A FedBuff buffer being filled: the staleness-weighted delta sum at one model version."""

    SUMMED = ("deltas",)

    version: int
    deltas: WeightedSum


def staleness_weight(staleness: int) -> float:
    """Return FedBuff's down-weighting ``1 / sqrt(1 + staleness)``."""
    return 1.0 / math.sqrt(1.0 + staleness)


class FedBuff(Strategy):
    """Buffered asynchronous aggregation: fill a buffer of K deltas, then step.

    Updates carry deltas (``takes_deltas``): ``ClientUpdate.weights`` must be
    ``y_i - x_base``, the client's model minus the model version it trained
    on, which the caller computes from the stored ``base_version``. The
    staleness is ``tau_i = version - update.base_version``; an update with
    ``tau_i > max_staleness`` raises ``StaleUpdate``. ``finish`` steps ``x <-
    x + server_lr * sum(s(tau_i) Δ_i) / max(K, n)`` with ``s(tau) = 1/sqrt(1 +
    tau)``, dividing by K even when the step closed on fewer updates, and by
    the ``n`` it holds when several workers' shares together overshot K (each
    folds until it hears the step closed), so no step is inflated. Streaming,
    O(model) memory.

    The current model version must be known: call ``set_version(v)`` (the
    version ``current`` is) before ``begin``; each ``finish`` that produces a
    model then advances it by one, so a strategy object kept across rounds
    needs it set only once.

    Parameters
    ----------
    buffer_size : int
        ``K``, updates per server step; >= 1. A ``fold`` beyond K raises ``ValueError``.
    server_lr : float
        Server learning rate ``eta_g``; > 0.
    max_staleness : int
        Largest accepted staleness; >= 0.
    """

    name = "fedbuff"
    takes_deltas = True
    buffered = True
    secure_refusal = "has no cohort to share keys in (asynchronous)"

    def __init__(
        self, *, buffer_size: int = 10, server_lr: float = 1.0, max_staleness: int = 10
    ) -> None:
        super().__init__()
        self.buffer_size = _checks.integer(self.name, "buffer_size", buffer_size, low=1)
        self.server_lr = _checks.number(self.name, "server_lr", server_lr, low=0.0, low_open=True)
        self.max_staleness = _checks.integer(self.name, "max_staleness", max_staleness)
        self.version: int | None = None

    def settings(self) -> dict[str, Scalar | None]:
        """Return the buffer size, server learning rate and staleness bound."""
        return {
            "buffer_size": self.buffer_size,
            "server_lr": self.server_lr,
            "max_staleness": self.max_staleness,
        }

    def set_version(self, version: int) -> None:
        """Set the version of the model the next ``begin`` receives."""
        self.version = _checks.integer(self.name, "version", version)

    def begin(self, rnd: int, current: Weights) -> BufferState:
        """Return an empty buffer at the current version."""
        if self.version is None:
            raise ValueError(f"{self.name}: call set_version(v) before begin")
        return BufferState(self.version, WeightedSum(current))

    def staleness(self, state: BufferState, base_version: int, device_id: str = "update") -> int:
        """Return how many versions ``base_version`` is behind the buffer's.

        Raises ``StaleUpdate`` beyond ``max_staleness`` and ``ValueError`` for
        a version newer than the buffer's; the worker asks before it decodes
        an update, so a stale one costs no weights transfer.
        """
        staleness = state.version - base_version
        if staleness < 0:
            raise ValueError(
                f"{self.name}: {device_id} trained on v{base_version}, "
                f"newer than the current v{state.version}"
            )
        if staleness > self.max_staleness:
            raise StaleUpdate(
                f"{device_id} trained on v{base_version}, {staleness} versions "
                f"behind v{state.version} (max_staleness={self.max_staleness})"
            )
        return staleness

    def fold(self, state: BufferState, update: ClientUpdate) -> None:
        """Add the update's delta weighted by its staleness, or raise ``StaleUpdate``."""
        staleness = self.staleness(state, update.base_version, update.device_id)
        if state.deltas.count >= self.buffer_size:
            raise ValueError(f"{self.name}: buffer of {self.buffer_size} already full")
        state.deltas.add(update.weights, staleness_weight(staleness))

    def finish(self, rnd: int, current: Weights, state: BufferState) -> Weights | None:
        """Return the stepped model and advance the version, or ``None`` if the buffer is empty."""
        if state.deltas.count == 0:
            return None
        self.version = state.version + 1
        scale = self.server_lr / max(self.buffer_size, state.deltas.count)
        return step_from(current, state.deltas.sums, scale)

    def summary(self) -> dict[str, Any]:
        """Return the settings and the current model version."""
        return {**super().summary(), "version": self.version}

    def state_dict(self) -> dict[str, StateValue]:
        """Return the current model version (empty if never set)."""
        return {} if self.version is None else {"version": self.version}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore the current model version."""
        check_keys(self.name, state, scalars=("version",))
        version = state.get("version")
        self.version = None if version is None else _checks.integer(self.name, "version", version)
