"""The coordination service: REST API, round coordinator, aggregator worker, strategies."""

from aggregator_service.config import ExperimentConfig, load_config
from aggregator_service.errors import ConfigError, Conflict, NotFound, ServiceError, Unauthorized
from aggregator_service.evaluation import OnnxEvaluator
from aggregator_service.persistence import Database
from aggregator_service.rounds import RoundService
from aggregator_service.worker import AggregatorWorker

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
