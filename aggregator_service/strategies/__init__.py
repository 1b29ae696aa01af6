"""Server strategies: pure numpy, no I/O, one small interface."""

from __future__ import annotations

from aggregator_service.strategies.base import Strategy
from aggregator_service.strategies.fedavg import FedAvg
from aggregator_service.strategies.ops import WeightedSum, weighted_mean

STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (FedAvg,)}
"""Strategies by the name an experiment config uses."""

__all__ = ["STRATEGIES", "FedAvg", "Strategy", "WeightedSum", "weighted_mean"]
