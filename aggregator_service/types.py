"""Plain data the strategies work on: named numpy tensors and decoded client updates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

Weights = dict[str, np.ndarray]
"""Named float tensors in the model's parameter order."""

Scalar = float | int | str | bool


@dataclass(frozen=True)
class ClientUpdate:
    """One device's validated contribution to a round."""

    device_id: str
    weights: Mapping[str, np.ndarray]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
