"""Numeric building blocks shared by the strategies: pure numpy, no I/O."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator_service.types import Weights


class WeightedSum:
    """A running weighted sum of weight sets, folded one update at a time.

    Memory is two float64 copies of the model (the sums and one scratch buffer
    of the largest tensor) whatever the number of updates; each fold writes in
    place, so no per-update temporaries are allocated. float64 keeps the result
    insensitive to the order updates arrive in, to well below float32 precision.
    """

    def __init__(self, like: Mapping[str, np.ndarray]) -> None:
        self.sums: Weights = {k: np.zeros(v.shape, dtype=np.float64) for k, v in like.items()}
        self.dtypes = {k: v.dtype for k, v in like.items()}
        largest = max((v.size for v in like.values()), default=0)
        self._scratch = np.empty(largest, dtype=np.float64)
        self.total_weight = 0.0
        self.count = 0

    def add(self, weights: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold ``weight * weights`` into the sums."""
        for name, acc in self.sums.items():
            scratch = self._scratch[: acc.size].reshape(acc.shape)
            np.multiply(weights[name], weight, out=scratch)
            np.add(acc, scratch, out=acc)
        self.total_weight += weight
        self.count += 1

    def mean(self) -> Weights:
        """Return the weighted mean in each tensor's original dtype."""
        if self.total_weight <= 0:
            raise ValueError("no weight folded yet")
        return {
            k: (acc / self.total_weight).astype(self.dtypes[k], copy=False)
            for k, acc in self.sums.items()
        }


def weighted_mean(updates: list[tuple[Mapping[str, np.ndarray], float]]) -> Weights:
    """Return the weighted mean of several weight sets (the batch form of ``WeightedSum``)."""
    if not updates:
        raise ValueError("weighted_mean of nothing")
    acc = WeightedSum(updates[0][0])
    for weights, weight in updates:
        acc.add(weights, weight)
    return acc.mean()
