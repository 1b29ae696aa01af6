"""DP-FedAvg (McMahan et al. 2018) with optional adaptive clipping (Andrew et al. 2021)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator_service.privacy.accountant import PrivacyAccountant
from aggregator_service.privacy.clipping import AdaptiveClipper, clip_factor
from aggregator_service.privacy.noise import (
    add_gaussian_noise,
    gaussian_noise_std,
    update_noise_multiplier,
)
from aggregator_service.strategies import _checks
from aggregator_service.strategies.base import StateValue, Strategy
from aggregator_service.strategies.ops import SummedState, WeightedSum, check_keys, step_from
from aggregator_service.types import ClientUpdate, RunShape, Scalar, Weights

_RNG_KEYS = ("rng_state", "rng_inc", "rng_has_uint32", "rng_uinteger")


@dataclass
class DPState(SummedState):
    """A DP-FedAvg round in progress: the clipped delta sum and the unclipped count."""

    SUMMED = ("clipped", "unclipped")

    base: Weights
    clip_norm: float
    clipped: WeightedSum
    unclipped: int = 0


class DPFedAvg(Strategy):
    """Clip each client's delta, average without weights over the expected count, add noise.

    Per round, with ``C`` the clip norm and ``m = sampling_rate *
    num_clients`` the expected number of updates: each delta ``y_i - x`` is
    scaled to L2 norm at most ``C``, the clipped deltas are summed and divided
    by ``m`` (the fixed-denominator estimator, so the output's sensitivity to
    one client is ``C / m``), ``N(0, (z C / m)²)`` noise is added per
    coordinate and ``x <- x + server_lr * noised mean``. Streaming, O(model)
    memory; clipping uses no per-update temporaries.

    With ``target_quantile`` set, ``C`` adapts after each round toward that
    quantile of the update norms, and the round's privacy budget ``z`` is split
    between the update noise ``z_Δ`` and the count noise (see
    ``update_noise_multiplier``), so epsilon stays that of multiplier ``z``.

    ``epsilon`` (RDP accountant, Poisson sampling at ``sampling_rate``) is
    updated by each ``finish`` and reported by ``summary``; it is ``None`` when
    ``noise_multiplier`` is 0. Leave ``seed`` unset outside tests: a known seed
    makes the noise predictable and voids the guarantee.

    Parameters
    ----------
    clip_norm : float
        ``C`` (the initial one when adaptive); > 0.
    noise_multiplier : float
        ``z``; >= 0 (0 clips without privacy).
    sampling_rate : float
        Chance each client takes part in a round; in (0, 1].
    num_clients : int
        Size of the client population; >= 1.
    delta : float
        Target delta of the reported epsilon; in (0, 1).
    target_quantile : float, optional
        Quantile of update norms that ``C`` tracks; in (0, 1). ``None`` fixes ``C``.
    clip_learning_rate : float
        ``eta_C`` of the geometric clip update; > 0.
    clip_count_stddev : float, optional
        Noise std on the unclipped count; ``None`` uses ``expected clients / 20``.
    server_lr : float
        Server learning rate; > 0.
    seed : int, optional
        Seed of the noise generator, for reproducible tests only.
    """

    name = "dpfedavg"
    secure_refusal = (
        "clips each update on the server, which sees none (distributed DP is not built)"
    )

    @classmethod
    def derived_settings(
        cls, given: Mapping[str, Scalar | None], run: RunShape
    ) -> dict[str, Scalar]:
        """Return the federation's size and the share of it sampled each round."""
        rate = min(1.0, run.clients_per_round / max(run.clients, 1))
        return {"num_clients": run.clients, "sampling_rate": rate}

    def __init__(
        self,
        *,
        clip_norm: float,
        noise_multiplier: float,
        sampling_rate: float,
        num_clients: int,
        delta: float = 1e-5,
        target_quantile: float | None = None,
        clip_learning_rate: float = 0.2,
        clip_count_stddev: float | None = None,
        server_lr: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        n = self.name
        self.clip_norm = _checks.positive(n, "clip_norm", clip_norm)
        self.noise_multiplier = _checks.number(n, "noise_multiplier", noise_multiplier, low=0.0)
        self.sampling_rate = _checks.number(
            n, "sampling_rate", sampling_rate, low=0.0, high=1.0, low_open=True
        )
        self.num_clients = _checks.integer(n, "num_clients", num_clients, low=1)
        self.delta = _checks.open_unit(n, "delta", delta)
        self.server_lr = _checks.positive(n, "server_lr", server_lr)
        self.seed = None if seed is None else _checks.integer(n, "seed", seed)
        self.target_quantile = (
            None
            if target_quantile is None
            else _checks.open_unit(n, "target_quantile", target_quantile)
        )
        self.clip_learning_rate = _checks.positive(n, "clip_learning_rate", clip_learning_rate)
        self.expected_clients = self.sampling_rate * self.num_clients
        # Andrew et al. recommend sigma_b = m / 20 for the count noise.
        self.clip_count_stddev = (
            self.expected_clients / 20.0
            if clip_count_stddev is None
            else _checks.number(n, "clip_count_stddev", clip_count_stddev, low=0.0)
        )
        self._rng = np.random.default_rng(self.seed)
        self._clipper = self._adaptive_clipper()
        self.update_noise_multiplier = (
            self.noise_multiplier
            if self._clipper is None
            else update_noise_multiplier(self.noise_multiplier, self.clip_count_stddev)
        )
        self._accountant = self._new_accountant()
        self.epsilon: float | None = None if self._accountant is None else 0.0

    def _adaptive_clipper(self) -> AdaptiveClipper | None:
        """Return the clip-norm tracker when a target quantile is set."""
        if self.target_quantile is None:
            return None
        return AdaptiveClipper(
            clip_norm=self.clip_norm,
            target_quantile=self.target_quantile,
            learning_rate=self.clip_learning_rate,
            count_stddev=self.clip_count_stddev,
            expected_clients=self.expected_clients,
            rng=self._rng,
        )

    def _new_accountant(self) -> PrivacyAccountant | None:
        """Return a fresh accountant, or ``None`` when no noise is added."""
        if self.noise_multiplier == 0:
            return None
        return PrivacyAccountant(self.noise_multiplier, self.sampling_rate, self.delta)

    def settings(self) -> dict[str, Scalar | None]:
        """Return the settings as configured (``clip_norm`` is the initial one)."""
        return {
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "sampling_rate": self.sampling_rate,
            "num_clients": self.num_clients,
            "delta": self.delta,
            "target_quantile": self.target_quantile,
            "clip_learning_rate": self.clip_learning_rate,
            "clip_count_stddev": self.clip_count_stddev,
            "server_lr": self.server_lr,
            "seed": self.seed,
        }

    @property
    def current_clip_norm(self) -> float:
        """Return the clip norm the next round uses."""
        return self._clipper.clip_norm if self._clipper is not None else self.clip_norm

    @property
    def rounds(self) -> int:
        """Return the number of noised rounds accounted for."""
        return self._accountant.steps if self._accountant is not None else 0

    def begin(self, rnd: int, current: Weights) -> DPState:
        """Return an empty round state clipping at the current clip norm."""
        return DPState(current, self.current_clip_norm, WeightedSum(current))

    def fold(self, state: DPState, update: ClientUpdate) -> None:
        """Clip the update's delta to ``C`` and add it, unweighted."""
        norm = math.sqrt(state.clipped.sq_distance(update.weights, state.base))
        state.clipped.add_delta(update.weights, state.base, clip_factor(norm, state.clip_norm))
        state.unclipped += norm <= state.clip_norm

    def finish(self, rnd: int, current: Weights, state: DPState) -> Weights | None:
        """Return the noised step, then adapt ``C`` and account the round."""
        if state.clipped.count == 0:
            return None
        m = self.expected_clients
        mean = {k: s / m for k, s in state.clipped.sums.items()}
        std = gaussian_noise_std(self.update_noise_multiplier, state.clip_norm, m)
        add_gaussian_noise(mean, std, self._rng)
        if self._clipper is not None:
            self._clipper.update(state.unclipped)
        if self._accountant is not None:
            self.epsilon = self._accountant.step()
        return step_from(current, mean, self.server_lr)

    def summary(self) -> dict[str, Any]:
        """Return the settings, the current clip norm, rounds accounted and epsilon."""
        return {
            **super().summary(),
            "current_clip_norm": self.current_clip_norm,
            "rounds": self.rounds,
            "epsilon": self.epsilon,
        }

    def round_metrics(self) -> dict[str, float]:
        """Return the epsilon spent so far (at ``delta``) and the clip norm of the next round."""
        figures = {"clip_norm": self.current_clip_norm}
        if self.epsilon is not None:
            figures["epsilon"] = self.epsilon
        return figures

    def state_dict(self) -> dict[str, StateValue]:
        """Return the current clip norm, the rounds accounted and the noise generator's state."""
        rng = self._rng.bit_generator.state
        return {
            "clip_norm": self.current_clip_norm,
            "rounds": self.rounds,
            "rng_state": int(rng["state"]["state"]),
            "rng_inc": int(rng["state"]["inc"]),
            "rng_has_uint32": int(rng["has_uint32"]),
            "rng_uinteger": int(rng["uinteger"]),
        }

    def load_state_dict(self, state: Mapping[str, StateValue]) -> None:
        """Restore the clip norm, re-account the rounds and restore the generator."""
        check_keys(self.name, state, scalars=("clip_norm", "rounds", *_RNG_KEYS))
        if "clip_norm" in state and self._clipper is not None:
            self._clipper.clip_norm = _checks.number(
                self.name, "clip_norm", state["clip_norm"], low=0.0, low_open=True
            )
        rounds = _checks.integer(self.name, "rounds", state.get("rounds", 0))
        self._accountant = self._new_accountant()
        if self._accountant is not None:
            self.epsilon = self._accountant.step(rounds) if rounds else 0.0
        if all(k in state for k in _RNG_KEYS):
            self._rng.bit_generator.state = {
                "bit_generator": "PCG64",
                "state": {"state": int(state["rng_state"]), "inc": int(state["rng_inc"])},
                "has_uint32": int(state["rng_has_uint32"]),
                "uinteger": int(state["rng_uinteger"]),
            }
