"""FedAvg (McMahan et al. 2017) and the variants that only change its server step or its config."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator_service.strategies import _checks
from aggregator_service.strategies.base import StateValue, Strategy
from aggregator_service.strategies.ops import (
    WeightedSum,
    check_keys,
    check_like,
    flatten_state,
    step_from,
    unflatten_state,
)
from aggregator_service.types import ClientUpdate, Scalar, Weights


class FedAvg(Strategy):
    """Average client weights, each weighted by its number of training examples.

    Folding is streaming: O(model) memory whatever the number of updates.
    Subclasses change the server step by overriding ``server_update``.
    """

    name = "fedavg"
    secure_refusal = None

    def begin(self, rnd: int, current: Weights) -> WeightedSum:
        """Return an empty example-weighted sum shaped like ``current``."""
        return WeightedSum(current)

    def fold(self, state: WeightedSum, update: ClientUpdate) -> None:
        """Add the update's weights, scaled by its example count."""
        state.add(update.weights, float(update.num_examples))

    def finish(self, rnd: int, current: Weights, state: WeightedSum) -> Weights | None:
        """Return the server step from the weighted mean, or ``None`` if no update arrived."""
        if state.count == 0:
            return None
        return self.server_update(rnd, current, state)

    def server_update(self, rnd: int, current: Weights, state: WeightedSum) -> Weights:
        """Return the next global model from a non-empty round (FedAvg: the mean itself)."""
        return state.mean()


class FedProx(FedAvg):
    """FedAvg on the server; devices add the proximal term (mu/2)||w - w_t||² (Li et al. 2020).

    Parameters
    ----------
    proximal_mu : float
        Weight of the proximal term sent to devices as ``proximal_mu``; >= 0.
    """

    name = "fedprox"

    def __init__(self, *, proximal_mu: float = 0.01) -> None:
        super().__init__()
        self.proximal_mu = _checks.number(self.name, "proximal_mu", proximal_mu, low=0.0)

    def settings(self) -> dict[str, Scalar | None]:
        """Return the proximal weight."""
        return {"proximal_mu": self.proximal_mu}

    def configure_round(self, rnd: int) -> Mapping[str, Scalar]:
        """Ask devices to train with the proximal term."""
        return {"proximal_mu": self.proximal_mu}


class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu et al. 2019).

    With the pseudo-gradient ``g = x - mean(y_i)``, the server keeps
    ``v <- momentum * v + g`` (``v`` starts at zero) and steps
    ``x <- x - server_lr * v``. ``server_lr=1, momentum=0`` is FedAvg.

    Parameters
    ----------
    server_lr : float
        Server learning rate; > 0.
    momentum : float
        Server momentum; in [0, 1).
    """

    name = "fedavgm"

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.server_lr = _checks.number(self.name, "server_lr", server_lr, low=0.0, low_open=True)
        self.momentum = _checks.number(
            self.name, "momentum", momentum, low=0.0, high=1.0, high_open=True
        )
        self._velocity: Weights = {}

    def settings(self) -> dict[str, Scalar | None]:
        """Return the server learning rate and momentum."""
        return {"server_lr": self.server_lr, "momentum": self.momentum}

    def server_update(self, rnd: int, current: Weights, state: WeightedSum) -> Weights:
        """Fold the round's pseudo-gradient into the velocity and step against it."""
        if self._velocity:
            check_like(self.name, "velocity", self._velocity, current)
        else:
            self._velocity = {k: np.zeros(v.shape, np.float64) for k, v in current.items()}
        mean = state.mean64()
        for name, v in self._velocity.items():
            grad = np.subtract(current[name], mean[name], out=mean[name])
            v *= self.momentum
            v += grad
        return step_from(current, self._velocity, -self.server_lr)

    def state_dict(self) -> dict[str, StateValue]:
        """Return the velocity (empty before the first round)."""
        return dict(flatten_state("velocity", self._velocity))

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore the velocity."""
        check_keys(self.name, state, prefixes=("velocity",))
        self._velocity = unflatten_state("velocity", state)
