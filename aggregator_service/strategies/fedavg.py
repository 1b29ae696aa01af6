"""FedAvg (McMahan et al. 2017): the example-weighted mean of the clients' models."""

from __future__ import annotations

from aggregator_service.strategies.base import Strategy
from aggregator_service.strategies.ops import WeightedSum
from aggregator_service.types import ClientUpdate, Weights


class FedAvg(Strategy):
    """Average client weights, each weighted by its number of training examples."""

    name = "fedavg"

    def fold(self, state: WeightedSum, update: ClientUpdate) -> None:
        """Add the update's weights, scaled by its example count."""
        state.add(update.weights, float(update.num_examples))

    def finish(self, rnd: int, current: Weights, state: WeightedSum) -> Weights | None:
        """Return the weighted mean, or ``None`` if no update arrived."""
        if state.count == 0:
            return None
        return state.mean()
