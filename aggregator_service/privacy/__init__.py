"""Differential privacy for aggregation: clipping, Gaussian noise, accounting, DP-FedAvg."""

from __future__ import annotations

from aggregator_service.privacy.accountant import PrivacyAccountant
from aggregator_service.privacy.clipping import AdaptiveClipper, clip_factor, clip_update, l2_norm
from aggregator_service.privacy.dpfedavg import DPFedAvg
from aggregator_service.privacy.noise import (
    add_gaussian_noise,
    gaussian_noise_std,
    update_noise_multiplier,
)

__all__ = [
    "AdaptiveClipper",
    "DPFedAvg",
    "PrivacyAccountant",
    "add_gaussian_noise",
    "clip_factor",
    "clip_update",
    "gaussian_noise_std",
    "l2_norm",
    "update_noise_multiplier",
]
