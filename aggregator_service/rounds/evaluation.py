"""Held-out evaluation of committed versions: each experiment's evaluator, built once."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from aggregator_service.config import ExperimentConfig
from broker import decode_weights
from model_store import ModelStore
from model_store.artifacts import ONNX

log = logging.getLogger(__name__)


class Evaluator(Protocol):
    """Scores a set of weights on held-out data."""

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Return metrics such as ``loss`` and ``accuracy``."""
        ...


EvaluatorFactory = Callable[[ExperimentConfig, bytes], Evaluator | None]
"""Builds an experiment's evaluator from its config and ONNX graph (None: no evaluation)."""


class Evaluations:
    """Scores committed versions with each experiment's evaluator, built at first use.

    Parameters
    ----------
    store
        Where the weights and the experiment's version-0 ONNX graph are read.
    factory
        Builds an experiment's evaluator (None: no experiment is scored).
    config_of
        An experiment's config, by id.
    """

    def __init__(
        self,
        store: ModelStore,
        factory: EvaluatorFactory | None,
        config_of: Callable[[str], ExperimentConfig],
    ) -> None:
        self._store = store
        self._factory = factory
        self._config_of = config_of
        self._evaluators: dict[str, Evaluator | None] = {}

    def scores(self, experiment_id: str, version: int, weights_sha256: str) -> dict[str, float]:
        """Return the metrics of a committed version; empty if it cannot be scored.

        Never raises: a failed evaluation must not lose the committed round.
        """
        try:
            evaluator = self._evaluator(experiment_id)
        except Exception:
            log.exception("building the evaluator of %s failed", experiment_id)
            return {}
        if evaluator is None:
            return {}
        try:
            scores = evaluator.evaluate(decode_weights(self._store.get_blob(weights_sha256)))
        except Exception:
            log.exception("evaluating %s v%d failed", experiment_id, version)
            return {}
        # A model poisoned within the float range scores NaN or inf; JSON has no such number.
        unscored = sorted(name for name, value in scores.items() if not math.isfinite(value))
        if unscored:
            log.warning("%s v%d: %s not finite, left out", experiment_id, version, unscored)
        return {name: value for name, value in scores.items() if name not in unscored}

    def forget(self, experiment_id: str) -> None:
        """Drop a deleted experiment's evaluator."""
        self._evaluators.pop(experiment_id, None)

    def _evaluator(self, experiment_id: str) -> Evaluator | None:
        if experiment_id not in self._evaluators:
            evaluator = None
            if self._factory is not None:
                manifest = self._store.get_manifest(experiment_id, 0)
                onnx = self._store.get_blob(manifest.artifacts[ONNX].sha256)
                evaluator = self._factory(self._config_of(experiment_id), onnx)
            self._evaluators[experiment_id] = evaluator
        return self._evaluators[experiment_id]
