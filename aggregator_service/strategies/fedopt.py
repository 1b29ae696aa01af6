"""Adaptive server optimisers FedAdagrad, FedAdam and FedYogi (Reddi et al. 2021)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator_service.strategies import _checks
from aggregator_service.strategies.base import StateValue
from aggregator_service.strategies.fedavg import FedAvg
from aggregator_service.strategies.ops import (
    WeightedSum,
    check_keys,
    check_like,
    flatten_state,
    step_from,
    unflatten_state,
)
from aggregator_service.types import Scalar, Weights


class FedOpt(FedAvg):
    """Base of the adaptive optimisers: FedAvg's mean, then an adaptive server step.

    Algorithm 2 of Reddi et al., per coordinate, with ``Δ = mean(y_i) - x``
    (example-weighted mean): ``m <- beta_1 m + (1 - beta_1) Δ``, ``v`` updated
    by ``second_moment``, ``x <- x + eta m / (sqrt(v) + tau)``. ``m`` starts at
    zero and ``v`` at ``tau²``; there is no bias correction, as in the paper.
    Subclasses override ``second_moment`` only.

    Parameters
    ----------
    eta : float
        Server learning rate; > 0.
    beta_1 : float
        First-moment decay; in [0, 1).
    tau : float
        Adaptivity (numerical floor of the denominator); > 0.
    """

    name = "fedopt"

    def __init__(self, *, eta: float = 0.1, beta_1: float = 0.9, tau: float = 1e-3) -> None:
        super().__init__()
        self.eta = _checks.number(self.name, "eta", eta, low=0.0, low_open=True)
        self.beta_1 = _checks.number(self.name, "beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        self.tau = _checks.number(self.name, "tau", tau, low=0.0, low_open=True)
        self._m: Weights = {}
        self._v: Weights = {}

    def settings(self) -> dict[str, Scalar | None]:
        """Return the optimiser's hyper-parameters."""
        return {"eta": self.eta, "beta_1": self.beta_1, "tau": self.tau}

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Update ``v`` in place from the squared pseudo-gradient."""
        raise NotImplementedError

    def server_update(self, rnd: int, current: Weights, state: WeightedSum) -> Weights:
        """Update both moments with the round's pseudo-gradient and take the adaptive step."""
        if self._m:
            check_like(self.name, "first moment", self._m, current)
            check_like(self.name, "second moment", self._v, current)
        else:
            self._m = {k: np.zeros(x.shape, np.float64) for k, x in current.items()}
            self._v = {k: np.full(x.shape, self.tau**2) for k, x in current.items()}
        direction = state.mean64()
        for name, delta in direction.items():
            np.subtract(delta, current[name], out=delta)
            m, v = self._m[name], self._v[name]
            m *= self.beta_1
            m += (1.0 - self.beta_1) * delta
            self.second_moment(v, np.square(delta, out=delta))
            # The step direction reuses the delta's buffer: m / (sqrt(v) + tau).
            np.sqrt(v, out=delta)
            delta += self.tau
            np.divide(m, delta, out=delta)
        return step_from(current, direction, self.eta)

    def state_dict(self) -> dict[str, StateValue]:
        """Return both moments (empty before the first round)."""
        return {**flatten_state("m", self._m), **flatten_state("v", self._v)}

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore both moments."""
        check_keys(self.name, state, prefixes=("m", "v"))
        m, v = unflatten_state("m", state), unflatten_state("v", state)
        if set(m) != set(v):
            raise ValueError(
                f"{self.name}: moments cover different tensors {sorted(m)}/{sorted(v)}"
            )
        self._m, self._v = m, v


class FedAdagrad(FedOpt):
    """FedAdagrad: ``v <- v + Δ²``; no momentum by default (``beta_1 = 0``).

    Parameters
    ----------
    eta : float
        Server learning rate; > 0.
    beta_1 : float
        First-moment decay; in [0, 1).
    tau : float
        Adaptivity; > 0.
    """

    name = "fedadagrad"

    def __init__(self, *, eta: float = 0.1, beta_1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta_1=beta_1, tau=tau)

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Accumulate the squared pseudo-gradient."""
        v += delta_sq


class FedAdam(FedOpt):
    """FedAdam: ``v <- beta_2 v + (1 - beta_2) Δ²``.

    Parameters
    ----------
    eta : float
        Server learning rate; > 0.
    beta_1 : float
        First-moment decay; in [0, 1).
    beta_2 : float
        Second-moment decay; in [0, 1).
    tau : float
        Adaptivity; > 0.
    """

    name = "fedadam"

    def __init__(
        self, *, eta: float = 0.1, beta_1: float = 0.9, beta_2: float = 0.99, tau: float = 1e-3
    ) -> None:
        super().__init__(eta=eta, beta_1=beta_1, tau=tau)
        self.beta_2 = _checks.number(self.name, "beta_2", beta_2, low=0.0, high=1.0, high_open=True)

    def settings(self) -> dict[str, Scalar | None]:
        """Return the optimiser's hyper-parameters."""
        return {**super().settings(), "beta_2": self.beta_2}

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Take the exponential moving average of the squared pseudo-gradient."""
        v *= self.beta_2
        v += (1.0 - self.beta_2) * delta_sq


class FedYogi(FedAdam):
    """FedYogi: ``v <- v - (1 - beta_2) Δ² sign(v - Δ²)``, an additive, sign-controlled update.

    Parameters
    ----------
    eta : float
        Server learning rate; > 0.
    beta_1 : float
        First-moment decay; in [0, 1).
    beta_2 : float
        Second-moment decay; in [0, 1).
    tau : float
        Adaptivity; > 0.
    """

    name = "fedyogi"

    def second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Move ``v`` toward ``Δ²`` by at most ``(1 - beta_2) Δ²`` per coordinate."""
        v -= (1.0 - self.beta_2) * delta_sq * np.sign(v - delta_sq)
