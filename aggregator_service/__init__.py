"""The coordination service: REST API, round coordinator, aggregator worker, strategies.

The names below load their module on first use: a worker process needs
neither the database layer nor the REST API nor the evaluator, whose imports
(SQLAlchemy, alembic, Flask, onnxruntime) cost more CPU than its start
otherwise does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from aggregator_service.errors import ConfigError, Conflict, NotFound, ServiceError, Unauthorized

if TYPE_CHECKING:
    from aggregator_service.config import ExperimentConfig, load_config
    from aggregator_service.evaluation import OnnxEvaluator
    from aggregator_service.persistence import Database
    from aggregator_service.rounds import RoundService
    from aggregator_service.worker import AggregatorWorker

_LAZY = {
    "AggregatorWorker": "aggregator_service.worker",
    "Database": "aggregator_service.persistence",
    "ExperimentConfig": "aggregator_service.config",
    "OnnxEvaluator": "aggregator_service.evaluation",
    "RoundService": "aggregator_service.rounds",
    "load_config": "aggregator_service.config",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'aggregator_service' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AggregatorWorker",
    "ConfigError",
    "Conflict",
    "Database",
    "ExperimentConfig",
    "NotFound",
    "OnnxEvaluator",
    "RoundService",
    "ServiceError",
    "Unauthorized",
    "load_config",
]
