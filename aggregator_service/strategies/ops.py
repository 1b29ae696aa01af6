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

    def mean64(self) -> Weights:
        """Return the weighted mean in float64, for server optimisers to step from."""
        if self.total_weight <= 0:
            raise ValueError("no weight folded yet")
        return {k: acc / self.total_weight for k, acc in self.sums.items()}

    def mean(self) -> Weights:
        """Return the weighted mean in each tensor's original dtype."""
        return {k: acc.astype(self.dtypes[k], copy=False) for k, acc in self.mean64().items()}


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
