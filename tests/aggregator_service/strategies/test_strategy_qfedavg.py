from __future__ import annotations

import numpy as np
import pytest

from aggregator_service.strategies import QFedAvg
from aggregator_service.types import ClientUpdate


def _u(values: list[float], loss: float | None) -> ClientUpdate:
    metrics = {} if loss is None else {"loss_before": loss}
    return ClientUpdate("d", {"w": np.array(values)}, 100, metrics)


UPDATES = [_u([1.0, 0.0], 1.0), _u([0.0, 1.0], 3.0)]


def test_qfedavg_weights_clients_by_their_loss_as_in_the_paper() -> None:
    current = {"w": np.zeros(2)}
    # q = 1, L = 1 / lr = 2. Client a: F = 1, Δw = L (w - w_a) = [-2, 0], ||Δw||² = 4,
    # Δ = F Δw = [-2, 0], h = q F^0 4 + L F = 6. Client b: F = 3, Δw = [0, -2],
    # Δ = [0, -6], h = 4 + 2 * 3 = 10. w_new = w - ([-2, 0] + [0, -6]) / 16 = [0.125, 0.375].
    new = QFedAvg(q=1.0, lr=0.5).aggregate(1, current, UPDATES)

    assert new is not None
    np.testing.assert_allclose(new["w"], [0.125, 0.375])


def test_qfedavg_with_q_two_favours_the_worse_client_more() -> None:
    current = {"w": np.zeros(2)}
    # q = 2, L = 2: a: Δ = 1 [-2, 0], h = 2 * 1 * 4 + 2 * 1 = 10;
    # b: Δ = 9 [0, -2] = [0, -18], h = 2 * 3 * 4 + 2 * 9 = 42; w_new = [2, 18] / 52.
    new = QFedAvg(q=2.0, lipschitz=2.0).aggregate(1, current, UPDATES)

    assert new is not None
    np.testing.assert_allclose(new["w"], [2 / 52, 18 / 52])


def test_qfedavg_with_q_zero_is_the_unweighted_mean() -> None:
    current = {"w": np.zeros(2)}
    # q = 0: Δ_k = L (w - w_k), h_k = L, so w_new = mean(w_k) = [0.5, 0.5].
    new = QFedAvg(q=0.0, lr=0.5).aggregate(1, current, UPDATES)

    assert new is not None
    np.testing.assert_allclose(new["w"], [0.5, 0.5])


@pytest.mark.parametrize("loss", [None, 0.0, -1.0, float("nan")])
def test_qfedavg_needs_a_positive_loss_before_training(loss: float | None) -> None:
    strategy = QFedAvg(lr=0.1)
    state = strategy.begin(1, {"w": np.zeros(2)})

    with pytest.raises(ValueError, match="loss_before"):
        strategy.fold(state, _u([1.0, 1.0], loss))


def test_qfedavg_reports_the_lipschitz_estimate_it_uses() -> None:
    assert QFedAvg(lr=0.25).summary()["lipschitz"] == 4.0
