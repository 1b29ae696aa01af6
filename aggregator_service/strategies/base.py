"""The strategy interface: configure a round, fold updates, finish the round."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np

from aggregator_service.strategies.ops import WeightedSum
from aggregator_service.types import ClientUpdate, RunShape, Scalar, Weights

StateValue = np.ndarray | float | int
"""One entry of a strategy's checkpointable server state."""


class Strategy:
    """Base of every server strategy; subclasses override one or two hooks.

    ``begin`` returns the round's running state, ``fold`` adds one update to it
    and ``finish`` turns it into the next global model. ``aggregate`` is the
    batch form, defined by the streaming one so both always agree.

    A strategy object lives across rounds and may carry server state (momentum,
    moments, control variates) that ``finish`` advances, so ``finish`` is called
    once per round. ``state_dict`` and ``load_state_dict`` checkpoint that state.
    Each subclass types its own round state; the base leaves it ``Any``.

    Parameters
    ----------
    **settings
        The base strategy takes none; an unknown setting is a ``TypeError``.
    """

    name: ClassVar[str] = "base"

    keeps_updates: ClassVar[bool] = False
    """Whether the round state holds every update (robust rules): checkpointed only at close."""
    takes_deltas: ClassVar[bool] = False
    """Whether ``ClientUpdate.weights`` must be the client's delta, not its model."""
    takes_control_delta: ClassVar[bool] = False
    """Whether updates carry a control-variate delta (``control_delta/<name>`` tensors)."""
    buffered: ClassVar[bool] = False
    """Whether a round is a server step over a buffer of updates, stale ones included,
    with no cohort: devices train continuously on whatever version is current."""
    secure_refusal: ClassVar[str | None] = "is not one it serves"
    """Why secure aggregation cannot serve this strategy (None: it can, because the
    round's state is one example-weighted sum, which masked updates add up to)."""

    @classmethod
    def derived_settings(
        cls, given: Mapping[str, Scalar | None], run: RunShape
    ) -> dict[str, Scalar]:
        """Return settings that follow from the run.

        The experiment adds them where ``given``, the user's settings, leaves them out.
        """
        return {}

    def __init__(self, **settings: Any) -> None:
        if settings:
            raise TypeError(f"{self.name} takes no setting(s) {sorted(settings)}")

    def settings(self) -> dict[str, Scalar | None]:
        """Return the strategy's settings as given (after validation)."""
        return {}

    def fewest_updates(self) -> int:
        """Return the fewest updates ``finish`` can step from (Krum: more than ``2f + 2``).

        An experiment whose rounds may commit with fewer is refused up front:
        every such round would fail at its combine.
        """
        return 1

    def configure_round(self, rnd: int) -> Mapping[str, Scalar]:
        """Return extra training settings sent to every device this round."""
        return {}

    def begin(self, rnd: int, current: Weights) -> Any:
        """Return the empty running state for a round starting from ``current``."""
        return WeightedSum(current)

    def fold(self, state: Any, update: ClientUpdate) -> None:
        """Fold one validated update into the running state."""
        raise NotImplementedError

    def finish(self, rnd: int, current: Weights, state: Any) -> Weights | None:
        """Return the next global model, or ``None`` when nothing was folded."""
        raise NotImplementedError

    def aggregate(
        self, rnd: int, current: Weights, updates: Iterable[ClientUpdate]
    ) -> Weights | None:
        """Aggregate a whole round's updates at once."""
        state = self.begin(rnd, current)
        for update in updates:
            self.fold(state, update)
        return self.finish(rnd, current, state)

    def summary(self) -> dict[str, Any]:
        """Return the strategy's name and settings, for records and logs."""
        return {"name": self.name, **self.settings()}

    def round_metrics(self) -> dict[str, float]:
        """Return figures of the server state recorded with each committed round (none here).

        Read after ``finish``: DP-FedAvg reports the privacy spent so far.
        """
        return {}

    def state_dict(self) -> dict[str, StateValue]:
        """Return a copy of the server state carried between rounds (empty when stateless)."""
        return {}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore server state saved by ``state_dict``."""
        if state:
            raise ValueError(f"{self.name} keeps no server state, got {sorted(state)}")
