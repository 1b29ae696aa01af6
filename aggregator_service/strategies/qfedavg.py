"""q-FedAvg (Li et al. 2020, q-FFL): fair aggregation weighting clients by their loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from aggregator_service.strategies import _checks
from aggregator_service.strategies.base import Strategy
from aggregator_service.strategies.ops import SummedState, WeightedSum, step_from
from aggregator_service.types import ClientUpdate, RunShape, Scalar, Weights

LOSS_BEFORE = "loss_before"
"""The metric key carrying a client's training loss at the round's global model."""


@dataclass
class QState(SummedState):
    """A q-FedAvg round in progress: the loss-weighted delta sum and the sum of the ``h_k``."""

    SUMMED = ("deltas", "h_sum")

    base: Weights
    deltas: WeightedSum
    h_sum: float = 0.0


class QFedAvg(Strategy):
    """q-FedAvg, Algorithm 2 of Li et al. 2020.

    With ``F_k`` the client's loss at the global model ``w`` and ``w_k`` its
    trained model: ``Δw_k = L (w - w_k)``, ``Δ_k = F_k^q Δw_k``, ``h_k = q
    F_k^(q-1) ||Δw_k||² + L F_k^q`` and ``w <- w - sum(Δ_k) / sum(h_k)``.
    ``q = 0`` is the unweighted mean of the clients' models. Streaming, O(model)
    memory.

    Each update must report ``metrics["loss_before"]`` (> 0), the loss of the
    global model on the client's training data before it trained.

    Parameters
    ----------
    q : float
        Fairness exponent; >= 0 (larger favours clients with high loss).
    lr : float, optional
        Client learning rate; the paper sets ``L = 1 / lr``.
    lipschitz : float, optional
        ``L`` directly; give exactly one of ``lr`` and ``lipschitz``.
    """

    name = "qfedavg"
    secure_refusal = "weighs each update by its own loss"

    @classmethod
    def derived_settings(
        cls, given: Mapping[str, Scalar | None], run: RunShape
    ) -> dict[str, Scalar]:
        """Return the devices' learning rate as ``lr``, unless ``lipschitz`` is given.

        The paper sets ``L = 1 / lr`` (Li et al. 2020).
        """
        return {} if "lipschitz" in given else {"lr": run.device_lr}

    def __init__(
        self, *, q: float = 0.2, lr: float | None = None, lipschitz: float | None = None
    ) -> None:
        super().__init__()
        self.q = _checks.number(self.name, "q", q, low=0.0)
        if (lr is None) == (lipschitz is None):
            raise ValueError(f"{self.name}: give exactly one of lr (L = 1/lr) and lipschitz")
        self.lr = (
            None if lr is None else _checks.number(self.name, "lr", lr, low=0.0, low_open=True)
        )
        self.lipschitz = (
            1.0 / self.lr
            if self.lr is not None
            else _checks.number(self.name, "lipschitz", lipschitz, low=0.0, low_open=True)
        )

    def settings(self) -> dict[str, Scalar | None]:
        """Return ``q`` and the Lipschitz estimate in use."""
        return {"q": self.q, "lr": self.lr, "lipschitz": self.lipschitz}

    def begin(self, rnd: int, current: Weights) -> QState:
        """Return an empty round state stepping from ``current``."""
        return QState(current, WeightedSum(current))

    def fold(self, state: QState, update: ClientUpdate) -> None:
        """Add ``F_k^q (w_k - w)`` to the sum and ``h_k`` to the denominator."""
        loss = _checks.metric(self.name, update.metrics, LOSS_BEFORE, update.device_id)
        if loss <= 0:
            raise ValueError(f"{self.name}: loss_before from {update.device_id} must be > 0")
        lip, q = self.lipschitz, self.q
        fq = loss**q
        sq = state.deltas.add_delta(update.weights, state.base, fq)
        # ||Δw_k||² = L² ||w - w_k||²; the first term vanishes at q = 0.
        state.h_sum += (q * loss ** (q - 1.0) * lip * lip * sq if q > 0 else 0.0) + lip * fq

    def finish(self, rnd: int, current: Weights, state: QState) -> Weights | None:
        """Return ``w + L sum(F_k^q (w_k - w)) / sum(h_k)``, or ``None`` if nothing was folded."""
        if state.deltas.count == 0:
            return None
        return step_from(current, state.deltas.sums, self.lipschitz / state.h_sum)
