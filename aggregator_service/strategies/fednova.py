"""FedNova (Wang et al. 2020): averaging normalised by each client's local work."""

from __future__ import annotations

from dataclasses import dataclass

from aggregator_service.strategies import _checks
from aggregator_service.strategies.base import Strategy
from aggregator_service.strategies.ops import SummedState, WeightedSum, step_from
from aggregator_service.types import ClientUpdate, Weights

LOCAL_STEPS = "local_steps"
"""The metric key carrying a client's local step count."""


@dataclass
class NovaState(SummedState):
    """A FedNova round in progress: sums of normalised deltas and of the weights."""

    SUMMED = ("normalised", "examples", "weighted_steps")

    base: Weights
    normalised: WeightedSum
    examples: float = 0.0
    weighted_steps: float = 0.0


class FedNova(Strategy):
    """Normalised averaging: each client's step is divided by its local work before averaging.

    For vanilla local SGD client ``i`` ran ``tau_i`` steps and ``||a_i||_1 =
    tau_i``. With ``p_i = n_i / sum(n)``, ``d_i = (x - y_i) / tau_i`` and
    ``tau_eff = sum(p_i tau_i)``, the server steps ``x <- x - tau_eff sum(p_i
    d_i)`` (the local learning rate cancels). With equal ``tau_i`` this is
    FedAvg. Streaming, O(model) memory.

    Each update must report ``metrics["local_steps"]`` (> 0): the local SGD
    step count, or ``||a_i||_1`` for another local solver (e.g. momentum SGD).
    The strategy takes no settings and sends devices none.
    """

    name = "fednova"
    secure_refusal = "weighs each update by its own local steps"

    def begin(self, rnd: int, current: Weights) -> NovaState:
        """Return an empty round state stepping from ``current``."""
        return NovaState(current, WeightedSum(current))

    def fold(self, state: NovaState, update: ClientUpdate) -> None:
        """Add the update's delta scaled by ``n_i / tau_i``, and ``n_i tau_i`` to the work sum."""
        steps = _checks.metric(self.name, update.metrics, LOCAL_STEPS, update.device_id)
        if steps <= 0:
            raise ValueError(f"{self.name}: local_steps from {update.device_id} must be > 0")
        n = float(update.num_examples)
        state.normalised.add_delta(update.weights, state.base, n / steps)
        state.examples += n
        state.weighted_steps += n * steps

    def finish(self, rnd: int, current: Weights, state: NovaState) -> Weights | None:
        """Return ``x + tau_eff sum(p_i (y_i - x) / tau_i)``, or ``None`` if nothing was folded."""
        if state.normalised.count == 0:
            return None
        if state.examples <= 0:
            raise ValueError(f"{self.name}: the round's updates carry no examples")
        tau_eff = state.weighted_steps / state.examples
        return step_from(current, state.normalised.sums, tau_eff / state.examples)
