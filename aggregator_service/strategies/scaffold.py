"""SCAFFOLD (Karimireddy et al. 2020): server side of stochastic controlled averaging."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from aggregator_service.strategies import _checks
from aggregator_service.strategies.base import StateValue, Strategy
from aggregator_service.strategies.ops import (
    SummedState,
    WeightedSum,
    check_keys,
    check_like,
    flatten_state,
    step_from,
    unflatten_state,
)
from aggregator_service.types import ClientUpdate, RunShape, Scalar, Weights


@dataclass
class ScaffoldState(SummedState):
    """A SCAFFOLD round in progress: sums of the model and control deltas."""

    SUMMED = ("model_deltas", "control_deltas")

    base: Weights
    model_deltas: WeightedSum
    control_deltas: WeightedSum


class Scaffold(Strategy):
    """Keep the server control variate ``c`` and apply the clients' model and control deltas.

    Algorithm 1 of the paper, server side, with ``S`` the round's updates:
    ``x <- x + server_lr * mean(y_i - x)`` and ``c <- c + (|S| / N) *
    mean(Δc_i)``, both unweighted. ``c`` starts at zero. Streaming, O(model)
    memory (two sums).

    Devices need ``c`` to train (``y <- y - lr (g(y) - c_i + c)``); ``control``
    returns it for the round's task. Every update must carry
    ``ClientUpdate.control_delta`` = ``c_i+ - c_i``, with the model's tensor
    names and shapes. ``configure_round`` sends ``{"scaffold": True}``.

    Parameters
    ----------
    num_clients : int
        ``N``, the number of clients in the federation; >= 1.
    server_lr : float
        Global step size ``eta_g``; > 0.
    """

    name = "scaffold"
    takes_control_delta = True
    secure_refusal = "needs each device's control delta (not masked yet)"

    @classmethod
    def derived_settings(
        cls, given: Mapping[str, Scalar | None], run: RunShape
    ) -> dict[str, Scalar]:
        """Return the federation's size as ``num_clients``."""
        return {"num_clients": run.clients}

    def __init__(self, *, num_clients: int, server_lr: float = 1.0) -> None:
        super().__init__()
        self.num_clients = _checks.integer(self.name, "num_clients", num_clients, low=1)
        self.server_lr = _checks.number(self.name, "server_lr", server_lr, low=0.0, low_open=True)
        self._control: Weights = {}

    def settings(self) -> dict[str, Scalar | None]:
        """Return the federation size and the global step size."""
        return {"num_clients": self.num_clients, "server_lr": self.server_lr}

    def configure_round(self, rnd: int) -> Mapping[str, Scalar]:
        """Ask devices to train with control variates and return their control delta."""
        return {"scaffold": True}

    def control(self, like: Mapping[str, np.ndarray] | None = None) -> Weights:
        """Return a copy of ``c`` in ``like``'s dtypes (zeros like ``like`` before round one)."""
        if not self._control:
            if like is None:
                raise ValueError(f"{self.name}: no control variate yet; pass the model as like")
            return {k: np.zeros(v.shape, v.dtype) for k, v in like.items()}
        if like is None:
            return {k: c.copy() for k, c in self._control.items()}
        return {k: c.astype(like[k].dtype) for k, c in self._control.items()}

    def begin(self, rnd: int, current: Weights) -> ScaffoldState:
        """Return empty sums for a round stepping from ``current``."""
        if self._control:
            check_like(self.name, "control variate", self._control, current)
        else:
            self._control = {k: np.zeros(v.shape, np.float64) for k, v in current.items()}
        return ScaffoldState(current, WeightedSum(current), WeightedSum(current))

    def fold(self, state: ScaffoldState, update: ClientUpdate) -> None:
        """Add the update's model delta and control delta."""
        delta = update.control_delta
        if delta is None:
            raise ValueError(
                f"{self.name} needs control_delta in every update; {update.device_id} sent none"
            )
        check_like(self.name, f"control_delta of {update.device_id}", delta, state.base)
        if state.model_deltas.count >= self.num_clients:
            raise ValueError(
                f"{self.name}: more updates in a round than num_clients={self.num_clients}"
            )
        state.model_deltas.add_delta(update.weights, state.base, 1.0)
        state.control_deltas.add(delta, 1.0)

    def finish(self, rnd: int, current: Weights, state: ScaffoldState) -> Weights | None:
        """Update ``c`` and return the stepped model, or ``None`` if nothing was folded."""
        count = state.model_deltas.count
        if count == 0:
            return None
        # (|S| / N) * mean(Δc_i) is simply sum(Δc_i) / N.
        for name, c in self._control.items():
            c += state.control_deltas.sums[name] / self.num_clients
        return step_from(current, state.model_deltas.sums, self.server_lr / count)

    def state_dict(self) -> dict[str, StateValue]:
        """Return the server control variate (empty before the first round)."""
        return dict(flatten_state("control", self._control))

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore the server control variate."""
        check_keys(self.name, state, prefixes=("control",))
        self._control = unflatten_state("control", state)
