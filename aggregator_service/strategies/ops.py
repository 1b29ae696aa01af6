"""Numeric building blocks shared by the strategies: pure numpy, no I/O."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from aggregator_service.types import Weights


@dataclass
class Partial:
    """One worker's share of a round's running state, as sums that add across workers.

    What a worker checkpoints and a combiner merges: ``tensors`` are float64
    sums (or, for the rules that keep every update, the updates themselves),
    ``scalars`` are totals (weights, counts). Merging shares in any order and
    grouping gives the state one worker folding every update would hold, up
    to float64 rounding.
    """

    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)


class Mergeable(ABC):
    """A round state that several workers can each hold a share of, and add up."""

    @abstractmethod
    def partial(self) -> Partial:
        """Return this worker's share of the state."""

    @abstractmethod
    def merge(self, partial: Partial) -> None:
        """Add another worker's share."""


class WeightedSum(Mergeable):
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

    def _buffer(self, acc: np.ndarray) -> np.ndarray:
        """Return the scratch buffer viewed with ``acc``'s shape."""
        return self._scratch[: acc.size].reshape(acc.shape)

    def add(self, weights: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold ``weight * weights`` into the sums."""
        for name, acc in self.sums.items():
            scratch = self._buffer(acc)
            # In float64: a float32 product of a large finite update and its
            # example count would overflow before it reached the float64 sums.
            np.multiply(weights[name], weight, out=scratch, dtype=np.float64)
            np.add(acc, scratch, out=acc)
        self.total_weight += weight
        self.count += 1

    def add_delta(
        self, weights: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], weight: float
    ) -> float:
        """Fold ``weight * (weights - base)`` into the sums and return ``||weights - base||²``."""
        sq = 0.0
        for name, acc in self.sums.items():
            scratch = self._buffer(acc)
            # Subtracting before scaling keeps the small client step exact even
            # when the weights themselves are large.
            np.subtract(weights[name], base[name], out=scratch)
            sq += float(np.vdot(scratch, scratch))
            np.multiply(scratch, weight, out=scratch)
            np.add(acc, scratch, out=acc)
        self.total_weight += weight
        self.count += 1
        return sq

    def sq_distance(
        self, weights: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]
    ) -> float:
        """Return ``||weights - base||²`` over all tensors, using the scratch buffer."""
        sq = 0.0
        for name, acc in self.sums.items():
            scratch = self._buffer(acc)
            np.subtract(weights[name], base[name], out=scratch)
            sq += float(np.vdot(scratch, scratch))
        return sq

    def partial(self, prefix: str = "") -> Partial:
        """Return the sums and totals, keyed ``prefix + name`` (views, not copies)."""
        return Partial(
            {prefix + k: v for k, v in self.sums.items()},
            {prefix + "total_weight": self.total_weight, prefix + "count": float(self.count)},
        )

    def merge(self, partial: Partial, prefix: str = "") -> None:
        """Add another worker's share (``partial``'s ``prefix``-keyed entries)."""
        for name, acc in self.sums.items():
            share = partial.tensors[prefix + name]
            if share.shape != acc.shape:
                raise ValueError(f"partial {prefix + name!r} has shape {share.shape}")
            np.add(acc, share, out=acc)
        self.total_weight += partial.scalars[prefix + "total_weight"]
        self.count += int(partial.scalars[prefix + "count"])

    def mean64(self) -> Weights:
        """Return the weighted mean in float64, for server optimisers to step from."""
        if self.total_weight <= 0:
            raise ValueError("no weight folded yet")
        return {k: acc / self.total_weight for k, acc in self.sums.items()}

    def mean(self) -> Weights:
        """Return the weighted mean in each tensor's original dtype."""
        return {k: acc.astype(self.dtypes[k], copy=False) for k, acc in self.mean64().items()}


class SummedState(Mergeable):
    """Mixin of a dataclass round state whose ``SUMMED`` fields add across workers.

    A ``WeightedSum`` field contributes its sums and totals under ``field/``;
    a number field its value. Every other field (the round's base model, a
    clip norm, a version) is the same on every worker and stays as begun.
    """

    SUMMED: ClassVar[tuple[str, ...]] = ()

    def partial(self) -> Partial:
        """Return this worker's share of the state."""
        out = Partial()
        for name in self.SUMMED:
            value = getattr(self, name)
            if isinstance(value, WeightedSum):
                share = value.partial(name + "/")
                out.tensors.update(share.tensors)
                out.scalars.update(share.scalars)
            else:
                out.scalars[name] = float(value)
        return out

    def merge(self, partial: Partial) -> None:
        """Add another worker's share."""
        for name in self.SUMMED:
            value = getattr(self, name)
            if isinstance(value, WeightedSum):
                value.merge(partial, name + "/")
            else:
                total = value + partial.scalars[name]
                setattr(self, name, type(value)(total))


def state_partial(state: object) -> Partial:
    """Return a round state's share as a ``Partial``; ``TypeError`` if it has none."""
    if isinstance(state, Mergeable):
        return state.partial()
    raise TypeError(f"{type(state).__name__} cannot be shared between workers")


def merge_state(state: object, partial: Partial) -> None:
    """Add ``partial`` into a round state (see ``state_partial``)."""
    if isinstance(state, Mergeable):
        state.merge(partial)
        return
    raise TypeError(f"{type(state).__name__} cannot be shared between workers")


def weighted_mean(updates: list[tuple[Mapping[str, np.ndarray], float]]) -> Weights:
    """Return the weighted mean of several weight sets (the batch form of ``WeightedSum``)."""
    if not updates:
        raise ValueError("weighted_mean of nothing")
    acc = WeightedSum(updates[0][0])
    for weights, weight in updates:
        acc.add(weights, weight)
    return acc.mean()


def step_from(
    current: Mapping[str, np.ndarray], direction: Mapping[str, np.ndarray], scale: float
) -> Weights:
    """Return ``current + scale * direction`` in each of ``current``'s dtypes."""
    out: Weights = {}
    for name, x in current.items():
        new = np.multiply(direction[name], scale, dtype=np.float64)
        new += x
        out[name] = new.astype(x.dtype, copy=False)
    return out


def check_like(owner: str, what: str, state: Mapping[str, np.ndarray], like: Weights) -> None:
    """Raise ``ValueError`` unless ``state`` has exactly ``like``'s tensor names and shapes."""
    if set(state) != set(like):
        raise ValueError(
            f"{owner}: {what} has tensors {sorted(state)}, the model has {sorted(like)}"
        )
    for name, value in state.items():
        if value.shape != like[name].shape:
            raise ValueError(
                f"{owner}: {what}[{name!r}] has shape {value.shape}, "
                f"the model's is {like[name].shape}"
            )


def flatten_state(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return copies of ``tensors`` keyed ``prefix/name``, for a ``state_dict``."""
    return {f"{prefix}/{name}": np.array(value, copy=True) for name, value in tensors.items()}


def unflatten_state(prefix: str, state: Mapping[str, object]) -> Weights:
    """Return the float64 tensors a ``state_dict`` keeps under ``prefix/``."""
    out: Weights = {}
    for key, value in state.items():
        if key.startswith(prefix + "/"):
            if not isinstance(value, np.ndarray):
                raise ValueError(f"state {key!r} must be an array, got {type(value).__name__}")
            out[key[len(prefix) + 1 :]] = np.array(value, dtype=np.float64, copy=True)
    return out


def check_keys(
    owner: str,
    state: Mapping[str, object],
    *,
    prefixes: tuple[str, ...] = (),
    scalars: tuple[str, ...] = (),
) -> None:
    """Raise ``ValueError`` if ``state`` has a key that is neither ``prefix/...`` nor a scalar."""

    def known(key: str) -> bool:
        head, slash, _ = key.partition("/")
        return key in scalars or (bool(slash) and head in prefixes)

    unknown = sorted(key for key in state if not known(key))
    if unknown:
        raise ValueError(f"{owner}: unknown server state {unknown}")
