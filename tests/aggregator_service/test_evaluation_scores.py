"""Held-out scores of committed versions: JSON-safe, and never a lost round."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from aggregator_service.config import ExperimentConfig
from aggregator_service.rounds.evaluation import Evaluations, Evaluator
from broker import encode_weights
from fedmq.defaults import DEMO_CONFIG
from model_store import MemoryStore

WEIGHTS = {"w": np.ones(3, np.float32)}


class Fixed:
    def __init__(self, scores: dict[str, float]) -> None:
        self.scores = scores

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        assert set(weights) == {"w"}
        return self.scores


def _evaluations(evaluator: Evaluator) -> tuple[Evaluations, str]:
    store = MemoryStore()
    store.publish("e", 0, {"model.onnx": (b"graph", "application/onnx")}, parent=None)
    sha = store.put_blob(encode_weights(WEIGHTS))
    config = ExperimentConfig.from_dict(DEMO_CONFIG)
    return Evaluations(store, lambda _config, _onnx: evaluator, lambda _id: config), sha


def test_scores_that_are_not_finite_are_left_out() -> None:
    # A model poisoned within the float range scored a NaN loss, which the API
    # once served as `NaN`: not JSON, so the dashboard could not read the rounds.
    evaluations, sha = _evaluations(Fixed({"loss": math.nan, "accuracy": 0.1, "x": math.inf}))

    assert evaluations.scores("e", 1, sha) == {"accuracy": 0.1}


def test_a_failing_evaluator_gives_no_scores() -> None:
    class Broken:
        def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
            raise RuntimeError("out of memory")

    evaluations, sha = _evaluations(Broken())

    assert evaluations.scores("e", 1, sha) == {}


def test_finite_scores_pass_through() -> None:
    evaluations, sha = _evaluations(Fixed({"loss": 0.5, "accuracy": 0.9}))

    assert evaluations.scores("e", 1, sha) == {"loss": 0.5, "accuracy": 0.9}
