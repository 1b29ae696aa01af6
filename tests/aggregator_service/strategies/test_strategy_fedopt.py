from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator_service.strategies import FedAdagrad, FedAdam, FedOpt, FedYogi
from aggregator_service.types import ClientUpdate, Weights

# Every case: x0 = [0, 1], eta = 1, beta_1 = 0.5, beta_2 = 0.75, tau = 0.5, so m starts
# at 0 and v at tau² = 0.25. Round 1's two equally weighted clients average to
# [0.5, 0.5], so Δ1 = [0.5, -0.5], Δ1² = [0.25, 0.25] and m1 = 0.5 Δ1 = [0.25, -0.25].
# Round 2 has one client at x1 + [1, 0]: Δ2 = [1, 0], m2 = 0.5 m1 + 0.5 Δ2 = [0.625, -0.125].
SETTINGS = {"eta": 1.0, "beta_1": 0.5, "tau": 0.5}


def _u(values: np.ndarray, n: int = 1) -> ClientUpdate:
    return ClientUpdate("d", {"w": values}, n)


def _two_rounds(strategy: FedOpt) -> tuple[Weights, Weights]:
    x0 = {"w": np.array([0.0, 1.0])}
    x1 = strategy.aggregate(1, x0, [_u(np.array([0.0, 1.0])), _u(np.array([1.0, 0.0]))])
    assert x1 is not None
    x2 = strategy.aggregate(2, x1, [_u(x1["w"] + np.array([1.0, 0.0]), 7)])
    assert x2 is not None
    return x1, x2


def test_fedadam_moments_follow_the_paper() -> None:
    strategy = FedAdam(**SETTINGS, beta_2=0.75)

    x1, x2 = _two_rounds(strategy)

    # v1 = 0.75 * 0.25 + 0.25 * 0.25 = 0.25; sqrt(v1) + tau = 1; x1 = x0 + m1 = [0.25, 0.75].
    np.testing.assert_allclose(x1["w"], [0.25, 0.75])
    # v2 = 0.75 * 0.25 + 0.25 * [1, 0] = [0.4375, 0.1875];
    # x2 = x1 + m2 / (sqrt(v2) + 0.5) = [0.25 + 0.625 / 1.161438, 0.75 - 0.125 / 0.933013].
    np.testing.assert_allclose(strategy.state_dict()["v/w"], [0.4375, 0.1875])
    np.testing.assert_allclose(strategy.state_dict()["m/w"], [0.625, -0.125])
    expected = [0.25 + 0.625 / (math.sqrt(0.4375) + 0.5), 0.75 - 0.125 / (math.sqrt(0.1875) + 0.5)]
    np.testing.assert_allclose(x2["w"], expected)
    np.testing.assert_allclose(x2["w"], [0.788126, 0.616025], atol=1e-6)


def test_fedyogi_changes_v_additively_by_sign() -> None:
    strategy = FedYogi(**SETTINGS, beta_2=0.75)

    x1, x2 = _two_rounds(strategy)

    # v1 = 0.25 - 0.25 * 0.25 * sign(0.25 - 0.25) = 0.25: the same first step as Adam.
    np.testing.assert_allclose(x1["w"], [0.25, 0.75])
    # v2 = v1 - 0.25 Δ2² sign(v1 - Δ2²) = [0.25 + 0.25, 0.25 - 0] = [0.5, 0.25]: where Adam
    # shrank v to 0.1875 (Δ = 0), Yogi keeps it. x2 = [0.25 + 0.625 / (sqrt(0.5) + 0.5),
    # 0.75 - 0.125 / 1] = [0.25 + 1.25 (sqrt(2) - 1), 0.625].
    np.testing.assert_allclose(strategy.state_dict()["v/w"], [0.5, 0.25])
    np.testing.assert_allclose(x2["w"], [0.25 + 1.25 * (math.sqrt(2) - 1), 0.625])


def test_fedadagrad_accumulates_squared_pseudo_gradients() -> None:
    strategy = FedAdagrad(**SETTINGS)

    x1, x2 = _two_rounds(strategy)

    # v1 = 0.25 + 0.25 = 0.5; x1 = x0 + m1 / (sqrt(0.5) + 0.5) = x0 ± 0.5 (sqrt(2) - 1).
    step1 = 0.5 * (math.sqrt(2) - 1)
    np.testing.assert_allclose(x1["w"], [step1, 1 - step1])
    # v2 = v1 + [1, 0] = [1.5, 0.5];
    # x2 = x1 + [0.625 / (sqrt(1.5) + 0.5), -0.125 / (sqrt(0.5) + 0.5)].
    np.testing.assert_allclose(strategy.state_dict()["v/w"], [1.5, 0.5])
    expected = [
        step1 + 0.625 / (math.sqrt(1.5) + 0.5),
        1 - step1 - 0.125 / (math.sqrt(0.5) + 0.5),
    ]
    np.testing.assert_allclose(x2["w"], expected)


def test_fedadagrad_has_no_momentum_by_default() -> None:
    assert FedAdagrad().beta_1 == 0.0
    assert "beta_2" not in FedAdagrad().summary()


def test_a_checkpoint_of_another_model_is_refused_at_the_next_round() -> None:
    strategy = FedAdam()
    strategy.load_state_dict({"m/other": np.zeros(2), "v/other": np.ones(2)})

    with pytest.raises(ValueError, match="tensors"):
        strategy.aggregate(1, {"w": np.zeros(2)}, [_u(np.ones(2))])
