"""Round coordination: experiments, selection, and the round state machine."""

from aggregator_service.rounds.evaluation import Evaluator, EvaluatorFactory
from aggregator_service.rounds.records import describe
from aggregator_service.rounds.service import RoundService

__all__ = ["Evaluator", "EvaluatorFactory", "RoundService", "describe"]
