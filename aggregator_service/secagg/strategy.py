"""The workers' side of secure aggregation: sum masked updates, unmask only the sum.

A secure round's share is a ``MaskedSum``: uint32 sums that wrap modulo
2^32, so shares add across workers (and regions) exactly like the float64
sums of a plain round. The combiner merges them, and only once the
coordinator has the seeds (``Unmasking``) removes the masks from the merged
sum and hands the inner strategy (FedAvg, FedProx, FedAvgM, the FedOpt
family) the example-weighted sum it would have folded in the clear.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator_service.strategies import FedAvg, Mergeable, Partial, StateValue, Strategy
from aggregator_service.strategies.ops import WeightedSum
from aggregator_service.types import ClientUpdate, Scalar, Weights
from broker.secagg import apply_mask, dequantize, flatten, unflatten
from broker.secagg.protocol import SEED_BYTES, b64, pair_sign, unb64

MASKED = np.dtype("<u4")
"""The dtype of a masked update's tensors and of their sums."""


class MaskedSum(Mergeable):
    """Masked updates summed modulo 2^32, with their example weights.

    Memory is one uint32 copy of the model whatever the number of updates;
    the sums mean nothing until the masks come off (``SecureSum.unmask``).
    """

    def __init__(self, like: Mapping[str, np.ndarray]) -> None:
        self.sums = {k: np.zeros(v.shape, dtype=MASKED) for k, v in like.items()}
        self.total_weight = 0.0
        self.count = 0

    def add(self, masked: Mapping[str, np.ndarray], weight: float) -> None:
        """Fold one masked update (uint32, wrapping) and its weight."""
        for name, acc in self.sums.items():
            np.add(acc, masked[name], out=acc)
        self.total_weight += weight
        self.count += 1

    def partial(self) -> Partial:
        """Return the sums and totals (views, not copies)."""
        return Partial(
            dict(self.sums), {"total_weight": self.total_weight, "count": float(self.count)}
        )

    def merge(self, partial: Partial) -> None:
        """Add another worker's share, modulo 2^32."""
        for name, acc in self.sums.items():
            share = partial.tensors[name]
            if share.shape != acc.shape or share.dtype != MASKED:
                raise ValueError(f"masked partial {name!r} is {share.dtype} {share.shape}")
            np.add(acc, share, out=acc)
        self.total_weight += partial.scalars["total_weight"]
        self.count += int(partial.scalars["count"])


@dataclass(frozen=True)
class Unmasking:
    """What removes the masks from a round's sum: reconstructed by the coordinator.

    ``seeds``: each summed device's self-mask seed. ``pairs``: for each
    summed device and each neighbour of it that shared keys but whose update
    is not in the sum, the pairwise seed of the two (the mask the summed
    device applied and nobody cancelled). ``scale``: the round's fixed-point
    scale, which its tasks gave the devices.
    """

    seeds: Mapping[str, bytes]
    pairs: tuple[tuple[str, str, bytes], ...] = ()
    scale: float = 1.0

    def to_json(self) -> bytes:
        """Return the JSON object the coordinator stores for the combiner."""
        return json.dumps(
            {
                "seeds": {d: b64(s) for d, s in sorted(self.seeds.items())},
                "pairs": [[u, v, b64(s)] for u, v, s in self.pairs],
                "scale": self.scale,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Unmasking:
        """Parse what ``to_json`` wrote; ``ValueError`` if it is not that."""
        raw = json.loads(data)
        seeds = {str(d): unb64(s, size=SEED_BYTES, what="seed") for d, s in raw["seeds"].items()}
        pairs = tuple(
            (str(u), str(v), unb64(s, size=SEED_BYTES, what="pair seed"))
            for u, v, s in raw["pairs"]
        )
        scale = float(raw["scale"])
        if not scale > 0:
            raise ValueError(f"scale must be positive, not {scale}")
        return cls(seeds, pairs, scale)

    def remove_from(self, masked: np.ndarray) -> None:
        """Take every mask this unmasking names off a flat uint32 sum, in place."""
        for seed in self.seeds.values():
            apply_mask(masked, seed, -1)  # each device added its own seed's mask
        for survivor, dropped, seed in self.pairs:
            apply_mask(masked, seed, -pair_sign(survivor, dropped))


class SecureSum(Strategy):
    """Folds masked updates; steps as ``inner`` from the unmasked example-weighted sum.

    Parameters
    ----------
    inner
        The strategy whose server step runs on the sum (FedAvg or a subclass).
    clip
        The largest magnitude of one value of a device's delta.
    max_examples
        The largest weight one update may carry. Each round's fixed-point
        scale comes with its unmasking: it follows from the weights its
        devices may claim.
    """

    name = "secure"

    def __init__(self, inner: FedAvg, *, clip: float, max_examples: int) -> None:
        super().__init__()
        if not clip > 0 or max_examples < 1:
            raise ValueError(f"clip {clip} must be positive and max_examples {max_examples} >= 1")
        self.inner = inner
        self.clip = clip
        self.max_examples = max_examples

    def settings(self) -> dict[str, Scalar | None]:
        """Return the inner strategy's settings."""
        return self.inner.settings()

    def summary(self) -> dict[str, Any]:
        """Return the inner strategy's name and settings, and the secure aggregation's."""
        return {
            **self.inner.summary(),
            "secure_aggregation": {"clip": self.clip, "max_examples": self.max_examples},
        }

    def configure_round(self, rnd: int) -> Mapping[str, Scalar]:
        """Return the inner strategy's training settings (FedProx's term)."""
        return self.inner.configure_round(rnd)

    def begin(self, rnd: int, current: Weights) -> MaskedSum:
        """Return an empty masked sum shaped like ``current``."""
        return MaskedSum(current)

    def fold(self, state: MaskedSum, update: ClientUpdate) -> None:
        """Add a masked update; refuse a weight above the cap the scale was chosen for."""
        if update.num_examples > self.max_examples:
            raise ValueError(
                f"num_examples {update.num_examples} is above secure aggregation's "
                f"max_examples {self.max_examples}"
            )
        state.add(update.weights, float(update.num_examples))

    def unmask(self, current: Weights, state: MaskedSum, unmasking: Unmasking) -> WeightedSum:
        """Return the plain example-weighted sum the masked ``state`` hides.

        The devices sent ``round(clip(y - x) * n * scale)`` masked; with the
        masks off the sum is ``sum(n * (y - x))`` up to rounding, so the sum of
        the models is that plus ``x`` times the total weight.
        """
        shapes = {k: v.shape for k, v in state.sums.items()}
        flat = flatten(state.sums).astype(MASKED, copy=True)
        unmasking.remove_from(flat)
        values = dequantize(flat, unmasking.scale)
        # Each device sent at most clip * weight * scale + 1/2 per value: past that
        # the seeds were wrong or a device sent words outside its range.
        bound = self.clip * state.total_weight + state.count / (2 * unmasking.scale)
        if values.size and np.abs(values).max() > bound * (1 + 1e-9):
            raise ValueError(
                f"the unmasked sum exceeds its bound {bound:g}: wrong seeds or a device's "
                "masked update out of range"
            )
        deltas = unflatten(values, shapes)
        plain = WeightedSum(current)
        for name, acc in plain.sums.items():
            np.multiply(current[name], state.total_weight, out=acc, dtype=np.float64)
            acc += deltas[name]
        plain.total_weight = state.total_weight
        plain.count = state.count
        return plain

    def finish(self, rnd: int, current: Weights, state: Any) -> Weights | None:
        """Return the inner strategy's step from an unmasked sum (see ``unmask``)."""
        if isinstance(state, MaskedSum):
            raise TypeError("a secure round's sum must be unmasked before it is finished")
        return self.inner.finish(rnd, current, state)

    def round_metrics(self) -> dict[str, float]:
        """Return the inner strategy's figures."""
        return self.inner.round_metrics()

    def state_dict(self) -> dict[str, StateValue]:
        """Return the inner strategy's server state."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore the inner strategy's server state."""
        self.inner.load_state_dict(state)
