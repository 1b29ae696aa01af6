"""Byzantine-robust rules that need every update at once: median, trimmed mean, (Multi-)Krum."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from aggregator_service.strategies import _checks
from aggregator_service.strategies.base import Strategy
from aggregator_service.strategies.ops import Mergeable, Partial
from aggregator_service.types import ClientUpdate, Scalar, Weights


@dataclass
class Collected(Mergeable):
    """A robust round in progress: the round's base model and every update's weights.

    These rules need every update in one place, so a worker's share is its
    updates themselves (``<i>/<tensor>``) and merging appends them: the
    combiner holds them all, as one worker would have.
    """

    base: Weights
    updates: list[Mapping[str, np.ndarray]] = field(default_factory=list)

    def partial(self) -> Partial:
        """Return the collected updates, keyed by their index."""
        tensors = {f"{i}/{k}": v for i, u in enumerate(self.updates) for k, v in u.items()}
        return Partial(tensors, {"updates": float(len(self.updates))})

    def merge(self, partial: Partial) -> None:
        """Append another worker's updates."""
        for i in range(int(partial.scalars["updates"])):
            self.updates.append({k: partial.tensors[f"{i}/{k}"] for k in self.base})


class RobustStrategy(Strategy):
    """Base of the rules that keep all updates; subclasses override ``combine``.

    Memory is O(n * model) for n updates: ``fold`` keeps a copy of each
    update's arrays (the caller's buffers may be views it reuses) and
    ``finish`` stacks one tensor at a time. ``max_updates`` bounds n.

    Parameters
    ----------
    max_updates : int
        Most updates one round may hold; one more makes ``fold`` raise ``ValueError``.
    """

    name = "robust"
    keeps_updates = True
    secure_refusal = "needs every update in the clear (a robust rule)"

    def __init__(self, *, max_updates: int = 1000) -> None:
        super().__init__()
        self.max_updates = _checks.integer(self.name, "max_updates", max_updates, low=1)

    def settings(self) -> dict[str, Scalar | None]:
        """Return the bound on updates per round."""
        return {"max_updates": self.max_updates}

    def begin(self, rnd: int, current: Weights) -> Collected:
        """Return an empty collection for a round starting from ``current``."""
        return Collected(current)

    def fold(self, state: Collected, update: ClientUpdate) -> None:
        """Keep a copy of the update's weights, unweighted, up to ``max_updates``."""
        if len(state.updates) >= self.max_updates:
            raise ValueError(f"{self.name}: more than max_updates={self.max_updates} in a round")
        state.updates.append({k: np.array(v, copy=True) for k, v in update.weights.items()})

    def finish(self, rnd: int, current: Weights, state: Collected) -> Weights | None:
        """Return the robust combination, or ``None`` if nothing was folded."""
        if not state.updates:
            return None
        return self.combine(current, state.updates)

    def combine(self, current: Weights, updates: list[Mapping[str, np.ndarray]]) -> Weights:
        """Return the next model from a non-empty list of client weights."""
        raise NotImplementedError


def _stack(updates: list[Mapping[str, np.ndarray]], name: str) -> np.ndarray:
    """Return one tensor of every update stacked along a new first axis."""
    return np.stack([u[name] for u in updates])


class Median(RobustStrategy):
    """Coordinate-wise median of the clients' weights (Yin et al. 2018), unweighted.

    Memory is O(n * model) for n updates.

    Parameters
    ----------
    max_updates : int
        Most updates one round may hold.
    """

    name = "median"

    def combine(self, current: Weights, updates: list[Mapping[str, np.ndarray]]) -> Weights:
        """Return the per-coordinate median."""
        return {
            k: np.median(_stack(updates, k), axis=0).astype(x.dtype, copy=False)
            for k, x in current.items()
        }


class TrimmedMean(RobustStrategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018), unweighted.

    Per coordinate, the ``floor(beta * n)`` largest and smallest of n values
    are dropped and the rest averaged; ``beta < 0.5`` always leaves at least
    one. Memory is O(n * model) for n updates.

    Parameters
    ----------
    beta : float
        Fraction trimmed from each side; in [0, 0.5).
    max_updates : int
        Most updates one round may hold.
    """

    name = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1, max_updates: int = 1000) -> None:
        super().__init__(max_updates=max_updates)
        self.beta = _checks.number(self.name, "beta", beta, low=0.0, high=0.5, high_open=True)

    def settings(self) -> dict[str, Scalar | None]:
        """Return the trimmed fraction and the bound on updates."""
        return {"beta": self.beta, **super().settings()}

    def combine(self, current: Weights, updates: list[Mapping[str, np.ndarray]]) -> Weights:
        """Return the per-coordinate mean of the middle values."""
        n = len(updates)
        cut = int(np.floor(self.beta * n))
        out: Weights = {}
        for name, x in current.items():
            ordered = np.sort(_stack(updates, name), axis=0)
            kept = ordered[cut : n - cut]
            out[name] = kept.mean(axis=0, dtype=np.float64).astype(x.dtype, copy=False)
        return out


class Krum(RobustStrategy):
    """Krum (Blanchard et al. 2017): the update closest to its ``n - f - 2`` nearest neighbours.

    Each update's score is the sum of its squared L2 distances to its ``n - f
    - 2`` nearest other updates; Krum returns the update with the lowest score
    (the first on a tie). It needs ``n > 2f + 2`` updates and raises
    ``ValueError`` otherwise. Memory is O(n * model) for n updates, plus an n x
    n distance matrix.

    Parameters
    ----------
    num_byzantine : int
        ``f``, the number of Byzantine clients tolerated; >= 0.
    max_updates : int
        Most updates one round may hold.
    """

    name = "krum"

    def __init__(self, *, num_byzantine: int = 0, max_updates: int = 1000) -> None:
        super().__init__(max_updates=max_updates)
        self.num_byzantine = _checks.integer(self.name, "num_byzantine", num_byzantine)

    def settings(self) -> dict[str, Scalar | None]:
        """Return ``f`` and the bound on updates."""
        return {"num_byzantine": self.num_byzantine, **super().settings()}

    def num_selected(self, n: int) -> int:
        """Return how many best-scored updates to average (Krum: one)."""
        return 1

    def fewest_updates(self) -> int:
        """Return ``2f + 3``: each score sums distances to ``n - f - 2`` others, at least one."""
        return 2 * self.num_byzantine + 3

    def scores(self, current: Weights, updates: list[Mapping[str, np.ndarray]]) -> np.ndarray:
        """Return each update's Krum score."""
        n, f = len(updates), self.num_byzantine
        if n < self.fewest_updates():
            raise ValueError(
                f"{self.name} with num_byzantine={f} needs > {2 * f + 2} updates, got {n}"
            )
        distances = np.zeros((n, n))
        for name, x in current.items():
            # Centring on the global model keeps the Gram-matrix form
            # |a|² + |b|² - 2ab from cancelling catastrophically.
            rows = _stack(updates, name).reshape(n, -1).astype(np.float64)
            rows -= x.reshape(1, -1)
            sq = np.einsum("ij,ij->i", rows, rows)
            distances += sq[:, None] + sq[None, :] - 2.0 * (rows @ rows.T)
        np.maximum(distances, 0.0, out=distances)
        np.fill_diagonal(distances, np.inf)
        nearest = np.sort(distances, axis=1)[:, : n - f - 2]
        scores: np.ndarray = nearest.sum(axis=1)
        return scores

    def combine(self, current: Weights, updates: list[Mapping[str, np.ndarray]]) -> Weights:
        """Return the unweighted mean of the best-scored update(s)."""
        order = np.argsort(self.scores(current, updates), kind="stable")
        chosen = [updates[i] for i in order[: self.num_selected(len(updates))]]
        return {
            k: np.mean(_stack(chosen, k), axis=0, dtype=np.float64).astype(x.dtype, copy=False)
            for k, x in current.items()
        }


class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al. 2017): the unweighted mean of the ``m`` best Krum scores.

    Memory is O(n * model) for n updates.

    Parameters
    ----------
    num_byzantine : int
        ``f``, the number of Byzantine clients tolerated; >= 0.
    num_selected : int, optional
        ``m``; ``None`` selects ``n - f``, capped at n.
    max_updates : int
        Most updates one round may hold.
    """

    name = "multikrum"

    def __init__(
        self, *, num_byzantine: int = 0, num_selected: int | None = None, max_updates: int = 1000
    ) -> None:
        super().__init__(num_byzantine=num_byzantine, max_updates=max_updates)
        self.m = (
            None
            if num_selected is None
            else _checks.integer(self.name, "num_selected", num_selected, low=1)
        )

    def settings(self) -> dict[str, Scalar | None]:
        """Return ``f``, ``m`` and the bound on updates."""
        return {"num_selected": self.m, **super().settings()}

    def num_selected(self, n: int) -> int:
        """Return ``m``, or ``n - f`` when unset, never more than ``n``."""
        return min(n, self.m if self.m is not None else n - self.num_byzantine)
