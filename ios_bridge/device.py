"""An emulated iOS device: evaluates with TorchScript lite, trains with ONNX Runtime."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from broker import TrainTask
from device_sdk.app import DeviceContext, TrainHandler, TrainResult
from device_sdk.emulator.fleet import TrainerFactory
from device_sdk.errors import TaskError
from device_sdk.trainers.onnxruntime import OrtSessionCache, OrtTrainer
from ios_bridge.package import IOS_PREFIX, LITE_MODULE, MANIFEST

if TYPE_CHECKING:
    import torch

__all__ = ["IosTrainer", "LiteModuleCache", "ios_trainers"]


class LiteModuleCache:
    """Loaded lite modules by artifact sha256, one copy per thread.

    The module holds no weights (they are inputs), so a copy serves every
    round and device; one per thread because the interpreter's thread
    safety is not documented.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, data: bytes) -> Any:
        """Return the lite module serialised in ``data``, loading it on first use."""
        from torch.jit.mobile import _load_for_lite_interpreter

        cache: dict[str, Any] = self._local.__dict__.setdefault("modules", {})
        key = hashlib.sha256(data).hexdigest()
        if key not in cache:
            try:
                cache[key] = _load_for_lite_interpreter(io.BytesIO(data))  # type: ignore[no-untyped-call]
            except RuntimeError as exc:
                raise TaskError(f"the TorchScript lite artifact does not load: {exc}") from exc
        return cache[key]


class IosTrainer:
    """A training handler of an emulated iOS device.

    It evaluates the round's global weights on its local data through the
    TorchScript lite module (as the app's LibTorch-Lite would) and trains
    through the package's ONNX Runtime training files (as the app's ORT
    training build would), reading every file from the task's ``ios/``
    artifacts.

    Parameters
    ----------
    x, y
        The device's local examples and integer labels.
    seed
        Seeds the batch order together with ``stream`` and the round.
    stream
        Separates this device's random stream from others with the same seed
        (default: derived from the device id).
    modules
        Loaded lite-module cache to share across a fleet.
    sessions
        Loaded ONNX Runtime training-session cache to share across a fleet.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        seed: int = 0,
        stream: int | None = None,
        modules: LiteModuleCache | None = None,
        sessions: OrtSessionCache | None = None,
    ) -> None:
        self._x = np.ascontiguousarray(x, dtype=np.float32)
        self._y = np.asarray(y, dtype=np.int64)
        self._modules = modules or LiteModuleCache()
        self._train = OrtTrainer(
            x, y, seed=seed, stream=stream, prefix=IOS_PREFIX, sessions=sessions
        )

    def __call__(self, task: TrainTask, ctx: DeviceContext) -> TrainResult:
        """Evaluate the global weights with the lite module, then train with ONNX Runtime.

        The result is the ONNX Runtime trainer's, with ``loss_before`` and
        ``accuracy_before`` replaced or added by the lite module's evaluation.
        """
        before = self.evaluate(ctx)
        result = self._train(task, ctx)
        return TrainResult(result.weights, result.num_examples, {**result.metrics, **before})

    def evaluate(self, ctx: DeviceContext) -> dict[str, float]:
        """Return the lite module's ``loss_before`` and ``accuracy_before`` on the local data."""
        import torch

        module = self._modules.get(ctx.artifact(IOS_PREFIX + LITE_MODULE))
        weights = [_tensor(ctx.weights, name) for name in _weight_inputs(ctx)]
        x, y = torch.from_numpy(self._x), torch.from_numpy(self._y)
        with torch.no_grad():
            try:
                logits = module(x, *weights)
            except RuntimeError as exc:
                raise TaskError(f"the TorchScript lite module does not run: {exc}") from exc
            loss = torch.nn.functional.cross_entropy(logits, y)
            accuracy = (logits.argmax(dim=1) == y).double().mean()
        return {"loss_before": float(loss), "accuracy_before": float(accuracy)}


def ios_trainers(seed: int) -> TrainerFactory:
    """Return a factory of emulated iOS trainers sharing their loaded-module caches.

    Parameters
    ----------
    seed
        The experiment's seed; device ``i`` uses stream ``i``.

    Returns
    -------
    TrainerFactory
        ``(x, y, index) -> IosTrainer``, for ``device_sdk``'s ``Fleet``.
    """
    import torch

    # One intra-op thread, as the TorchScript fleet does: devices train side
    # by side, and a fixed thread count keeps float results identical.
    torch.set_num_threads(1)
    modules, sessions = LiteModuleCache(), OrtSessionCache()

    def make(x: np.ndarray, y: np.ndarray, index: int) -> TrainHandler:
        return IosTrainer(x, y, seed=seed, stream=index, modules=modules, sessions=sessions)

    return make


def _weight_inputs(ctx: DeviceContext) -> list[str]:
    """Return the lite module's weight inputs in order, as the package manifest lists them."""
    try:
        names = json.loads(ctx.artifact(IOS_PREFIX + MANIFEST))["lite_module"]["inputs"][1:]
    except (ValueError, KeyError, TypeError) as exc:
        raise TaskError(f"the iOS package manifest lacks the lite module's inputs: {exc}") from exc
    missing = [name for name in names if name not in ctx.weights]
    if missing:
        raise TaskError(f"the task's weights lack the lite module's inputs {missing}")
    return [str(name) for name in names]


def _tensor(weights: Mapping[str, np.ndarray], name: str) -> torch.Tensor:
    """Return one weight as a float32 tensor (a copy: the arrays may be read-only)."""
    import torch

    return torch.tensor(np.asarray(weights[name], dtype=np.float32))
