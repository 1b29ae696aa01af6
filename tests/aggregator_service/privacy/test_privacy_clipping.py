from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator_service.privacy import (
    AdaptiveClipper,
    add_gaussian_noise,
    clip_update,
    gaussian_noise_std,
    l2_norm,
    update_noise_multiplier,
)


def test_clipping_scales_a_large_delta_onto_the_ball() -> None:
    delta = {"a": np.array([3.0]), "b": np.array([[4.0]], np.float32)}  # norm 5

    clipped, was_clipped = clip_update(delta, 1.0)

    assert was_clipped
    np.testing.assert_allclose(clipped["a"], [0.6])
    np.testing.assert_allclose(clipped["b"], [[0.8]])
    assert clipped["b"].dtype == np.float32
    assert l2_norm(clipped) == pytest.approx(1.0)
    np.testing.assert_array_equal(delta["a"], [3.0])  # the input is left alone


def test_clipping_leaves_a_small_delta_as_it_is() -> None:
    delta = {"a": np.array([0.3, 0.4])}

    clipped, was_clipped = clip_update(delta, 1.0)

    assert not was_clipped
    np.testing.assert_array_equal(clipped["a"], [0.3, 0.4])


def test_clipping_bounds_the_norm_of_random_deltas() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        delta = {"w": rng.normal(0, rng.uniform(0.1, 10), (4, 5))}
        clipped, _ = clip_update(delta, 2.0)
        assert l2_norm(clipped) <= 2.0 + 1e-9
    with pytest.raises(ValueError, match="clip_norm"):
        clip_update({"w": np.ones(2)}, 0.0)


def test_noise_std_is_z_c_over_the_expected_clients_and_matches_empirically() -> None:
    std = gaussian_noise_std(noise_multiplier=1.0, clip_norm=2.0, expected_clients=4.0)
    values = {"w": np.zeros(40_000)}

    add_gaussian_noise(values, std, np.random.default_rng(1))

    assert std == 0.5
    # The sample std of 40k draws is within 3 standard errors (0.5 / sqrt(80k)) of 0.5.
    assert abs(values["w"].std() - 0.5) < 3 * 0.5 / math.sqrt(80_000)
    assert abs(values["w"].mean()) < 3 * 0.5 / math.sqrt(40_000)


def test_adaptive_clipping_takes_the_geometric_step_of_the_paper() -> None:
    clipper = AdaptiveClipper(
        clip_norm=1.0,
        target_quantile=0.5,
        learning_rate=0.2,
        count_stddev=0.0,
        expected_clients=4,
        rng=np.random.default_rng(0),
    )

    # All 4 unclipped: b = 1, C = 1 * exp(-0.2 (1 - 0.5)) = exp(-0.1).
    shrunk = clipper.update(4)
    # None unclipped: b = 0, C = exp(-0.1) * exp(0.1) = 1.
    grown = clipper.update(0)

    assert shrunk == pytest.approx(math.exp(-0.1))
    assert grown == pytest.approx(1.0)


@pytest.mark.parametrize("start", [0.1, 100.0])
def test_adaptive_clipping_settles_near_the_target_quantile(start: float) -> None:
    norms = np.arange(1.0, 11.0)  # the median lies between 5 and 6
    clipper = AdaptiveClipper(
        clip_norm=start,
        target_quantile=0.5,
        learning_rate=0.5,
        count_stddev=0.5,
        expected_clients=len(norms),
        rng=np.random.default_rng(2),
    )

    for _ in range(100):
        clipper.update(int((norms <= clipper.clip_norm).sum()))

    assert 4.0 <= clipper.clip_norm <= 7.0


def test_the_update_noise_multiplier_leaves_room_for_the_count_noise() -> None:
    # z = 1, sigma_b = 1: z_Δ = (1 - (2)^-2)^(-1/2) = 1 / sqrt(0.75).
    assert update_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75))
    assert update_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(ValueError, match="clip_count_stddev"):
        update_noise_multiplier(1.0, 0.5)
