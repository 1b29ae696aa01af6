"""Gaussian noise for DP-FedAvg (McMahan et al. 2018)."""

from __future__ import annotations

import math

import numpy as np

from aggregator_service.strategies import _checks
from aggregator_service.types import Weights


def gaussian_noise_std(noise_multiplier: float, clip_norm: float, expected_clients: float) -> float:
    """Return the per-coordinate noise std ``z C / expected_clients`` on the averaged delta."""
    _checks.number("noise", "expected_clients", expected_clients, low=0.0, low_open=True)
    return noise_multiplier * clip_norm / expected_clients


def add_gaussian_noise(weights: Weights, std: float, rng: np.random.Generator) -> None:
    """Add i.i.d. ``N(0, std²)`` noise to every float64 tensor of ``weights``, in place."""
    if std <= 0:
        return
    for value in weights.values():
        value += rng.normal(0.0, std, size=value.shape)


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Return ``z_Δ``, the updates' share of ``z`` when the clipped count is noised too.

    Andrew et al. 2021: the count query has sensitivity 1/2, so noise
    ``sigma_b`` on it is a Gaussian mechanism of multiplier ``2 sigma_b`` and
    the pair composes to ``z`` when ``z_Δ = (z^-2 - (2 sigma_b)^-2)^(-1/2)``.

    Parameters
    ----------
    noise_multiplier : float
        ``z``, the multiplier of the whole round's mechanism; >= 0.
    count_stddev : float
        ``sigma_b``, the std of the noise on the unclipped count; must exceed ``z / 2``.

    Returns
    -------
    float
        ``z_Δ`` (0 when ``z`` is 0).
    """
    if noise_multiplier == 0:
        return 0.0
    if 2.0 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"adaptive clipping: clip_count_stddev={count_stddev:g} must exceed "
            f"noise_multiplier/2={noise_multiplier / 2:g}"
        )
    return 1.0 / math.sqrt(noise_multiplier**-2 - (2.0 * count_stddev) ** -2)
