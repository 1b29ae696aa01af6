"""Privacy accounting for DP-FedAvg with the maintained ``dp_accounting`` RDP accountant."""

from __future__ import annotations

from typing import Any

from aggregator_service.strategies import _checks


class PrivacyAccountant:
    """The (epsilon, delta) spent by rounds of a Poisson-sampled Gaussian mechanism.

    Each ``step`` composes one round, ``PoissonSampledDpEvent(sampling_rate,
    GaussianDpEvent(noise_multiplier))``, into ``dp_accounting``'s RDP
    accountant. ``dp_accounting`` is imported on first use because it pulls
    in scipy.signal (about a second).

    Parameters
    ----------
    noise_multiplier : float
        ``z``, noise std over sensitivity; > 0.
    sampling_rate : float
        ``q``, each client's chance of taking part in a round; in (0, 1].
    delta : float
        Target ``delta``; in (0, 1).
    """

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        owner = "privacy accountant"
        self.noise_multiplier = _checks.number(
            owner, "noise_multiplier", noise_multiplier, low=0.0, low_open=True
        )
        self.sampling_rate = _checks.number(
            owner, "sampling_rate", sampling_rate, low=0.0, high=1.0, low_open=True
        )
        self.delta = _checks.number(
            owner, "delta", delta, low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.steps = 0
        self._accountant: Any = None
        self._event: Any = None

    def _ensure(self) -> None:
        """Build the RDP accountant and the per-round event on first use."""
        if self._accountant is None:
            import dp_accounting

            self._accountant = dp_accounting.rdp.RdpAccountant()
            self._event = dp_accounting.PoissonSampledDpEvent(
                self.sampling_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
            )

    def step(self, rounds: int = 1) -> float:
        """Account for ``rounds`` more rounds and return the epsilon spent so far."""
        rounds = _checks.integer("privacy accountant", "rounds", rounds, low=1)
        self._ensure()
        self._accountant.compose(self._event, rounds)
        self.steps += rounds
        return self.epsilon

    @property
    def epsilon(self) -> float:
        """Return the epsilon spent so far at ``delta`` (0 before any round)."""
        if self.steps == 0:
            return 0.0
        self._ensure()
        return float(self._accountant.get_epsilon(self.delta))
