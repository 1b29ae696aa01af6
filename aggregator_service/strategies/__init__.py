"""Server strategies: pure numpy, no I/O, one small interface."""

from __future__ import annotations

from aggregator_service.strategies.base import StateValue, Strategy
from aggregator_service.strategies.fedavg import FedAvg, FedAvgM, FedProx
from aggregator_service.strategies.fedbuff import FedBuff, StaleUpdate, staleness_weight
from aggregator_service.strategies.fednova import FedNova
from aggregator_service.strategies.fedopt import FedAdagrad, FedAdam, FedOpt, FedYogi
from aggregator_service.strategies.ops import (
    Mergeable,
    Partial,
    WeightedSum,
    merge_state,
    state_partial,
    weighted_mean,
)
from aggregator_service.strategies.qfedavg import QFedAvg
from aggregator_service.strategies.robust import (
    Krum,
    Median,
    MultiKrum,
    RobustStrategy,
    TrimmedMean,
)
from aggregator_service.strategies.scaffold import Scaffold

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgM,
        FedProx,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedNova,
        Scaffold,
        QFedAvg,
        Median,
        TrimmedMean,
        Krum,
        MultiKrum,
        FedBuff,
    )
}
"""Strategies by the name an experiment config uses."""

__all__ = [
    "STRATEGIES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedNova",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "Krum",
    "Median",
    "Mergeable",
    "MultiKrum",
    "Partial",
    "QFedAvg",
    "RobustStrategy",
    "Scaffold",
    "StaleUpdate",
    "StateValue",
    "Strategy",
    "TrimmedMean",
    "WeightedSum",
    "merge_state",
    "staleness_weight",
    "state_partial",
    "weighted_mean",
]
