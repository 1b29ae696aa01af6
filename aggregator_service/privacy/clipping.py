"""Per-update L2 clipping, fixed or adaptive (Andrew et al. 2021)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from aggregator_service.strategies import _checks
from aggregator_service.types import Weights


def l2_norm(weights: Mapping[str, np.ndarray]) -> float:
    """Return the L2 norm of all tensors taken together as one vector."""
    return math.sqrt(sum(float(np.vdot(v, v)) for v in weights.values()))


def clip_factor(norm: float, clip_norm: float) -> float:
    """Return the scale ``min(1, clip_norm / norm)`` that brings ``norm`` within ``clip_norm``."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip_update(update_delta: Mapping[str, np.ndarray], clip_norm: float) -> tuple[Weights, bool]:
    """Return the delta scaled to L2 norm at most ``clip_norm``, and whether it was scaled.

    Parameters
    ----------
    update_delta : Mapping[str, np.ndarray]
        A client's update relative to the current global model.
    clip_norm : float
        The bound ``C``; > 0.

    Returns
    -------
    tuple[Weights, bool]
        New arrays in the delta's dtypes, and ``True`` if the norm exceeded ``C``.
    """
    _checks.number("clip_update", "clip_norm", clip_norm, low=0.0, low_open=True)
    factor = clip_factor(l2_norm(update_delta), clip_norm)
    clipped = {
        k: np.multiply(v, factor, dtype=np.float64).astype(v.dtype, copy=False)
        for k, v in update_delta.items()
    }
    return clipped, factor < 1.0


class AdaptiveClipper:
    """Track a clip norm that follows a quantile of the update norms (Andrew et al. 2021).

    After each round, with ``b_i = 1`` for each update no larger than ``C``,
    ``b = (sum(b_i) + N(0, count_stddev²)) / expected_clients`` and ``C <- C
    exp(-learning_rate (b - target_quantile))``: the geometric update, which
    grows ``C`` while too few updates fit and shrinks it while too many do.

    Parameters
    ----------
    clip_norm : float
        Initial ``C``; > 0.
    target_quantile : float
        ``gamma``, the fraction of updates meant to be unclipped; in (0, 1).
    learning_rate : float
        ``eta_C``; > 0 (the paper uses 0.2).
    count_stddev : float
        ``sigma_b``, the noise on the unclipped count; >= 0 (the paper uses expected_clients / 20).
    expected_clients : float
        Expected number of updates per round, the count's denominator; > 0.
    rng : numpy.random.Generator
        Source of the count noise.
    """

    def __init__(
        self,
        *,
        clip_norm: float,
        target_quantile: float,
        learning_rate: float,
        count_stddev: float,
        expected_clients: float,
        rng: np.random.Generator,
    ) -> None:
        owner = "adaptive clipping"
        self.clip_norm = _checks.number(owner, "clip_norm", clip_norm, low=0.0, low_open=True)
        self.target_quantile = _checks.number(
            owner,
            "target_quantile",
            target_quantile,
            low=0.0,
            high=1.0,
            low_open=True,
            high_open=True,
        )
        self.learning_rate = _checks.number(
            owner, "learning_rate", learning_rate, low=0.0, low_open=True
        )
        self.count_stddev = _checks.number(owner, "count_stddev", count_stddev, low=0.0)
        self.expected_clients = _checks.number(
            owner, "expected_clients", expected_clients, low=0.0, low_open=True
        )
        self._rng = rng

    def update(self, unclipped: int) -> float:
        """Move ``C`` from one round's count of unclipped updates and return the new ``C``."""
        noise = float(self._rng.normal(0.0, self.count_stddev)) if self.count_stddev > 0 else 0.0
        fraction = (unclipped + noise) / self.expected_clients
        self.clip_norm *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        return self.clip_norm
