"""The strategy interface: configure a round, fold updates, finish the round."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from aggregator_service.strategies.ops import WeightedSum
from aggregator_service.types import ClientUpdate, Scalar, Weights


class Strategy:
    """Base of every server strategy; subclasses override one or two hooks.

    ``begin`` returns the round's running state, ``fold`` adds one update to it
    and ``finish`` turns it into the next global model. ``aggregate`` is the
    batch form, defined by the streaming one so both always agree.
    """

    name: ClassVar[str] = "base"

    def __init__(self, **settings: Any) -> None:
        if settings:
            raise TypeError(f"{self.name} takes no setting(s) {sorted(settings)}")

    def configure_round(self, rnd: int) -> Mapping[str, Scalar]:
        """Return extra training settings sent to every device this round."""
        return {}

    def begin(self, rnd: int, current: Weights) -> WeightedSum:
        """Return the empty running state for a round starting from ``current``."""
        return WeightedSum(current)

    def fold(self, state: WeightedSum, update: ClientUpdate) -> None:
        """Fold one validated update into the running state."""
        raise NotImplementedError

    def finish(self, rnd: int, current: Weights, state: WeightedSum) -> Weights | None:
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
        return {"name": self.name}
