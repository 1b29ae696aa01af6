from __future__ import annotations

import numpy as np
import pytest

from aggregator_service.strategies import Krum, Median, MultiKrum, TrimmedMean
from aggregator_service.types import ClientUpdate, Weights

CURRENT: Weights = {"a": np.zeros(1, np.float32), "b": np.zeros(2, np.float32)}


def _u(a: float, b: tuple[float, float] = (0.0, 0.0)) -> ClientUpdate:
    return ClientUpdate("d", {"a": np.array([a], np.float32), "b": np.array(b, np.float32)}, 1)


def test_median_ignores_one_huge_outlier() -> None:
    # Per coordinate: a over [1, 2, 3, 1e6] -> (2 + 3) / 2 = 2.5; b[0] over [0, 0, 0, -1e6] -> 0.
    updates = [_u(1.0), _u(2.0), _u(3.0), _u(1e6, (-1e6, 5.0))]

    new = Median().aggregate(1, CURRENT, updates)

    assert new is not None
    np.testing.assert_allclose(new["a"], [2.5])
    np.testing.assert_allclose(new["b"], [0.0, 0.0])
    assert new["a"].dtype == np.float32


def test_trimmed_mean_drops_the_extremes_on_each_side() -> None:
    # beta = 0.2 of n = 5 trims one each side: a over [-1e6, 1, 2, 4, 1e6] -> mean(1, 2, 4) = 7/3.
    updates = [_u(1.0), _u(1e6), _u(2.0), _u(-1e6), _u(4.0)]

    new = TrimmedMean(beta=0.2).aggregate(1, CURRENT, updates)

    assert new is not None
    np.testing.assert_allclose(new["a"], [7 / 3], rtol=1e-6)


def test_trimmed_mean_with_beta_zero_is_the_plain_mean() -> None:
    new = TrimmedMean(beta=0.0).aggregate(1, CURRENT, [_u(1.0), _u(2.0), _u(6.0)])

    assert new is not None
    np.testing.assert_allclose(new["a"], [3.0])


# Points on a line (tensor b stays 0): 0, 1, 2, 3.5 and an outlier at 100.
# f = 1, n = 5: each score sums the squared distances to the n - f - 2 = 2 nearest others:
#   0: 1 + 4 = 5; 1: 1 + 1 = 2; 2: 1 + 2.25 = 3.25; 3.5: 2.25 + 6.25 = 8.5;
#   100: 96.5² + 98² = 9312.25 + 9604 = 18916.25.
LINE = [_u(0.0), _u(1.0), _u(2.0), _u(3.5), _u(100.0)]


def test_krum_scores_follow_the_paper_and_the_outlier_is_not_chosen() -> None:
    strategy = Krum(num_byzantine=1)

    scores = strategy.scores(CURRENT, [u.weights for u in LINE])
    new = strategy.aggregate(1, CURRENT, LINE)

    np.testing.assert_allclose(scores, [5.0, 2.0, 3.25, 8.5, 18916.25])
    assert new is not None
    np.testing.assert_array_equal(new["a"], [1.0])  # the best score, never the outlier


def test_krum_measures_distance_over_all_tensors() -> None:
    # The outlier hides in tensor b: three agree, one is far in b only.
    updates = [_u(1.0), _u(1.1), _u(0.9), _u(1.0, (50.0, 50.0)), _u(1.05)]

    new = Krum(num_byzantine=1).aggregate(1, CURRENT, updates)

    assert new is not None
    np.testing.assert_array_equal(new["b"], [0.0, 0.0])


def test_multikrum_averages_the_m_best_scores() -> None:
    # m = 2: the scores 2 and 3.25 -> points 1 and 2 -> 1.5.
    # Default m = n - f = 4: points 1, 2, 0, 3.5 -> 6.5 / 4 = 1.625.
    two = MultiKrum(num_byzantine=1, num_selected=2).aggregate(1, CURRENT, LINE)
    default = MultiKrum(num_byzantine=1).aggregate(1, CURRENT, LINE)

    assert two is not None and default is not None
    np.testing.assert_allclose(two["a"], [1.5])
    np.testing.assert_allclose(default["a"], [1.625])


def test_krum_needs_more_than_2f_plus_2_updates() -> None:
    with pytest.raises(ValueError, match="needs > 4"):
        Krum(num_byzantine=1).aggregate(1, CURRENT, LINE[:4])


def test_robust_rules_bound_the_updates_they_hold() -> None:
    strategy = Median(max_updates=2)
    state = strategy.begin(1, CURRENT)
    strategy.fold(state, _u(1.0))
    strategy.fold(state, _u(2.0))

    with pytest.raises(ValueError, match="max_updates"):
        strategy.fold(state, _u(3.0))
