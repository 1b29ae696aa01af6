"""Server-side evaluation of a model version through its ONNX graph (no torch here)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregator_service.config import ExperimentConfig
from model_store.ort import import_without_torch

ort = import_without_torch("onnxruntime")


class OnnxEvaluator:
    """Scores weights on a held-out set with one ONNX Runtime session.

    The exported graph keeps its parameters as overridable inputs, so every new
    model version is evaluated by feeding its weights; the session is built once.
    """

    def __init__(self, onnx_model: bytes, x: np.ndarray, y: np.ndarray, *, batch_size: int = 2000):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(
            onnx_model, options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name
        self._accepts = {i.name for i in self._session.get_overridable_initializers()}
        if not self._accepts:
            raise ValueError("the ONNX graph has no overridable initializers to feed weights into")
        self._x = np.ascontiguousarray(x, dtype=np.float32)
        self._y = np.asarray(y, dtype=np.int64)
        self._batch = batch_size

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Return mean cross-entropy ``loss`` and ``accuracy`` of ``weights`` on the set."""
        feeds = {k: v for k, v in weights.items() if k in self._accepts}
        loss_sum, correct = 0.0, 0
        for start in range(0, len(self._x), self._batch):
            xb = self._x[start : start + self._batch]
            yb = self._y[start : start + self._batch]
            logits = self._session.run(None, {self._input: xb, **feeds})[0].astype(np.float64)
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            loss_sum += float(-log_probs[np.arange(len(yb)), yb].sum())
            correct += int((logits.argmax(axis=1) == yb).sum())
        n = max(len(self._x), 1)
        return {"loss": loss_sum / n, "accuracy": correct / n}


def held_out_evaluator(config: ExperimentConfig, onnx_model: bytes) -> OnnxEvaluator | None:
    """Evaluate on the test split of the experiment's named data set, if it has one."""
    from device_sdk.data import DATASETS, load_dataset

    if config.data.dataset not in DATASETS:
        return None
    dataset = load_dataset(config.data.dataset)
    return OnnxEvaluator(onnx_model, dataset.x_test, dataset.y_test)
