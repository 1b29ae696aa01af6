"""Plain data the strategies work on: named numpy tensors and decoded client updates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

Weights = dict[str, np.ndarray]
"""Named float tensors in the model's parameter order."""

Scalar = float | int | str | bool


@dataclass(frozen=True)
class RunShape:
    """What a strategy may derive settings from: the federation and its devices' step."""

    clients: int
    """Devices in the federation."""
    clients_per_round: int
    """Devices a round selects."""
    device_lr: float
    """The devices' learning rate."""


@dataclass(frozen=True)
class ClientUpdate:
    """One device's validated contribution to a round.

    ``weights`` is the trained model, or its delta from the base model for a
    strategy whose ``takes_deltas`` is true (FedBuff). ``base_version`` is the
    model version the device trained on. ``control_delta`` is SCAFFOLD's
    ``c_i+ - c_i``, named and shaped like ``weights``. Strategies read extra
    inputs from ``metrics`` (FedNova ``local_steps``, q-FedAvg ``loss_before``).
    """

    device_id: str
    weights: Mapping[str, np.ndarray]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    base_version: int = 0
    control_delta: Mapping[str, np.ndarray] | None = None
