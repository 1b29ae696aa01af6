"""Train the task's ONNX Runtime training artifacts on local data, without torch.

This is what an Android or iOS app does with ONNX Runtime's on-device
training API, run in Python: the emulated mobile devices use it, and it needs
neither model code nor torch, only the four artifacts a task carries.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import sys
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from broker import TrainTask
from device_sdk.app import DeviceContext, TrainResult
from device_sdk.errors import TaskError, TrainingError
from device_sdk.trainers.batches import epoch_batches, local_data, round_rng

__all__ = ["TRAINING_FILES", "OrtSessionCache", "OrtTrainer"]

TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
#: The artifact set a task carries under the trainer's prefix. The same names
#: as ``model_store.export.TRAINING_FILES``, repeated because ``device_sdk``
#: may not import ``model_store``; a test holds the two equal.
TRAINING_FILES = (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT)

# The op of ORT's plain SGD graph. Operator types are stored as plain strings
# in the protobuf, so a byte search tells SGD from AdamW without parsing.
_SGD_OP = b"SGDOptimizerV2"

# Examples per eval call when measuring the loss before training: bounds the
# activations held at once on a device with much data.
_EVAL_CHUNK = 1024

_IMPORT_LOCK = threading.Lock()


def _training_api() -> ModuleType:
    """Import ``onnxruntime.training.api`` so that torch is not imported.

    ``model_store.ort.import_without_torch`` does this for inference, but
    ``device_sdk`` may not import ``model_store``, and the training API needs
    one more step. ORT probes for torch with ``find_spec``, which answers "not
    installed" for a module mapped to ``None`` in ``sys.modules``; but the
    ``onnxruntime.training`` package ``__init__`` then imports torch
    unconditionally (its fp16 optimizer helpers) and fails. The ``api``
    subpackage itself needs only ORT's C bindings, so it is loaded under a
    bare stand-in for its parent package, which is removed afterwards so a
    later ``import onnxruntime.training`` (say, by an exporter once torch is
    loaded) runs the real one.
    """
    name = "onnxruntime.training.api"
    with _IMPORT_LOCK:
        if name in sys.modules or "torch" in sys.modules or "onnxruntime.training" in sys.modules:
            return importlib.import_module(name)
        sys.modules["torch"] = None  # type: ignore[assignment]
        try:
            importlib.import_module("onnxruntime")
            spec = importlib.util.find_spec("onnxruntime.training")
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("this ONNX Runtime build has no training API")
            parent = ModuleType("onnxruntime.training")
            parent.__path__ = list(spec.submodule_search_locations)
            sys.modules["onnxruntime.training"] = parent
            try:
                return importlib.import_module(name)
            finally:
                if sys.modules.get("onnxruntime.training") is parent:
                    del sys.modules["onnxruntime.training"]
        finally:
            del sys.modules["torch"]


class _Session:
    """One loaded artifact set: checkpoint state, train/eval module and optimizer."""

    def __init__(self, folder: Path) -> None:
        try:
            api = _training_api()
            options = sys.modules["onnxruntime"].SessionOptions()
            # One intra-op thread: a fleet trains devices side by side, and a
            # fixed thread count keeps float results identical across runs.
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            # Errors only: ORT's generated SGD graph declares its "updated"
            # flag as shape [1] while ORT's own shape inference says scalar,
            # a warning on every load that no device can act on. Failures
            # still raise.
            options.log_severity_level = 3
            self.state = api.CheckpointState.load_checkpoint(folder / CHECKPOINT)
            self.module = api.Module(
                folder / TRAINING_MODEL, self.state, folder / EVAL_MODEL, session_options=options
            )
            self.optimizer = api.Optimizer(folder / OPTIMIZER_MODEL, self.module)
            self.shapes = {name: p.data.shape for name, p in self.state.parameters}
        except Exception as exc:  # ORT's errors derive from Exception only
            raise TaskError(f"the ONNX Runtime training artifacts do not load: {exc}") from exc

    def load(self, weights: Mapping[str, np.ndarray]) -> None:
        """Set every parameter from ``weights`` (by name, exactly)."""
        if set(weights) != set(self.shapes):
            raise TaskError(
                f"the weights {sorted(weights)} do not match the training "
                f"checkpoint's parameters {sorted(self.shapes)}"
            )
        for name, array in weights.items():
            if tuple(array.shape) != tuple(self.shapes[name]):
                raise TaskError(
                    f"weight {name!r} has shape {list(array.shape)}, the checkpoint "
                    f"{list(self.shapes[name])}"
                )
            value = np.ascontiguousarray(array, dtype=np.float32)
            self.state.parameters[name] = value

    def weights(self) -> dict[str, np.ndarray]:
        """Return copies of the current parameters."""
        # Parameter.data is a view of ORT's live buffer: the next task would
        # overwrite a result that is not copied out.
        return {
            name: np.array(self.state.parameters[name].data, dtype=np.float32, copy=True)
            for name in self.shapes
        }

    def mean_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        """Return the mean cross-entropy on ``x, y`` (eval graph, no update)."""
        self.module.eval()
        total = 0.0
        try:
            for start in range(0, len(x), _EVAL_CHUNK):
                xb, yb = x[start : start + _EVAL_CHUNK], y[start : start + _EVAL_CHUNK]
                total += float(self.module(xb, yb)) * len(xb)
        except Exception as exc:  # ORT's errors derive from Exception only
            raise TaskError(f"the eval graph does not run on this device's data: {exc}") from exc
        return total / len(x)

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """Take one SGD step on a batch; return the batch's loss before the step."""
        self.module.train()
        try:
            # Gradients accumulate across calls unless reset: zero them first.
            self.module.lazy_reset_grad()
            loss = float(self.module(x, y))
            self.optimizer.step()
        except Exception as exc:  # ORT's errors derive from Exception only
            raise TrainingError(f"an ONNX Runtime training step failed: {exc}") from exc
        return loss


class OrtSessionCache:
    """Loaded ONNX Runtime training sessions by artifact set, one per thread.

    ONNX Runtime loads artifacts from files, so each set is written once to a
    private temporary folder named by its sha256 (removed when the cache is
    collected). A set is loaded once per thread and reused across tasks and
    devices: each task sets every parameter, and plain SGD keeps no state.

    Parameters
    ----------
    keep
        Artifact sets each thread keeps loaded (least recently used go first).
    """

    def __init__(self, *, keep: int = 4) -> None:
        self._keep = keep
        self._local = threading.local()
        self._lock = threading.Lock()
        self._root: tempfile.TemporaryDirectory[str] | None = None

    def get(self, files: Mapping[str, bytes]) -> _Session:
        """Return the session of the artifact set ``files`` (name -> bytes)."""
        digest = hashlib.sha256()
        for name in TRAINING_FILES:
            digest.update(hashlib.sha256(files[name]).digest())
        key = digest.hexdigest()
        cache: OrderedDict[str, _Session] = self._local.__dict__.setdefault(
            "sessions", OrderedDict()
        )
        if key in cache:
            cache.move_to_end(key)
        else:
            cache[key] = _Session(self._folder(key, files))
            while len(cache) > self._keep:
                cache.popitem(last=False)
        return cache[key]

    def _folder(self, key: str, files: Mapping[str, bytes]) -> Path:
        """Return the folder holding the artifact set ``key``, writing it once."""
        with self._lock:
            if self._root is None:
                self._root = tempfile.TemporaryDirectory(prefix="fedmq-ort-")
            folder = Path(self._root.name) / key
            if not folder.is_dir():
                # Written aside and renamed, so a folder that exists is complete.
                partial = Path(tempfile.mkdtemp(dir=self._root.name, prefix=".partial-"))
                for name in TRAINING_FILES:
                    (partial / name).write_bytes(files[name])
                partial.rename(folder)
            return folder


@dataclass(frozen=True)
class _Plan:
    """The training settings plain SGD honours."""

    epochs: int
    batch_size: int
    lr: float


def _plain_sgd(settings: Mapping[str, Any]) -> _Plan:
    """Read the task's settings; refuse, naming it, any that plain SGD cannot honour."""
    optimizer = str(settings.get("optimizer", "sgd"))
    if optimizer != "sgd":
        raise TaskError(
            f"training.optimizer={optimizer!r} is not supported: "
            "the ONNX Runtime training artifacts run plain SGD"
        )
    for key in ("momentum", "weight_decay"):
        value = float(settings.get(key, 0.0))
        if value != 0.0:
            raise TaskError(
                f"training.{key}={value} is not supported: ONNX Runtime's SGD artifact "
                f"has no {key.replace('_', ' ')}"
            )
    mu = float(settings.get("proximal_mu", 0.0))
    if mu > 0:
        raise TaskError(
            f"training.proximal_mu={mu} is not supported: the training graph has "
            "no FedProx proximal term"
        )
    if settings.get("scaffold"):
        raise TaskError(
            "training.scaffold is not supported: the training graph cannot apply "
            "SCAFFOLD's gradient correction"
        )
    try:
        plan = _Plan(
            int(settings.get("epochs", 1)),
            int(settings.get("batch_size", 32)),
            float(settings.get("lr", 0.05)),
        )
    except (TypeError, ValueError) as exc:
        raise TaskError(f"bad training settings: {exc}") from exc
    if plan.epochs < 1 or plan.batch_size < 1 or not math.isfinite(plan.lr) or plan.lr <= 0:
        raise TaskError(f"bad training settings: {plan}")
    return plan


class OrtTrainer:
    """A training handler: plain SGD with cross-entropy through ONNX Runtime only.

    It trains exactly as :class:`~device_sdk.trainers.TorchScriptTrainer` does
    with plain SGD (same batches in the same order, same metrics), from the
    task's ONNX Runtime training artifacts instead of a TorchScript module.

    Parameters
    ----------
    x, y
        The device's local examples and integer labels.
    seed
        Seeds the batch order together with ``stream`` and the round.
    stream
        Separates this device's random stream from others with the same seed
        (default: derived from the device id).
    prefix
        The artifact set's name prefix in the task: the trainer reads
        ``prefix + name`` for each of :data:`TRAINING_FILES`.
    sessions
        Loaded-session cache to share across a fleet.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        seed: int = 0,
        stream: int | None = None,
        prefix: str = "android/",
        sessions: OrtSessionCache | None = None,
    ) -> None:
        self._x, self._y = local_data(x, y)
        self._seed = seed
        self._stream = stream
        self._prefix = prefix
        self._sessions = sessions or OrtSessionCache()

    def __call__(self, task: TrainTask, ctx: DeviceContext) -> TrainResult:
        """Train the task's artifacts from the global weights; return the new weights.

        The metrics are ``loss`` (the last epoch's mean), ``loss_before`` (the
        global model's loss on this device's data) and ``local_steps``.
        Settings plain SGD cannot honour (another optimizer, momentum, weight
        decay, a FedProx term, SCAFFOLD) are refused with ``TaskError``.
        """
        plan = _plain_sgd(task.training)
        files = {name: ctx.artifact(self._prefix + name) for name in TRAINING_FILES}
        if _SGD_OP not in files[OPTIMIZER_MODEL]:
            # Another optimizer keeps state (AdamW's moments) that would leak
            # from one task into the next through the reused session.
            raise TaskError(f"{self._prefix}{OPTIMIZER_MODEL} is not ONNX Runtime's plain SGD")
        session = self._sessions.get(files)
        session.load(ctx.weights)
        loss_before = session.mean_loss(self._x, self._y)
        rng = round_rng(self._seed, task.round, self._stream, ctx.device_id)
        try:
            session.optimizer.set_learning_rate(plan.lr)
        except Exception as exc:  # ORT's errors derive from Exception only
            raise TaskError(f"cannot set the learning rate {plan.lr}: {exc}") from exc
        loss, steps = self._train(session, plan, rng)
        if not math.isfinite(loss):
            raise TrainingError(f"training diverged (loss {loss})")
        metrics = {"loss": loss, "loss_before": loss_before, "local_steps": float(steps)}
        return TrainResult(session.weights(), len(self._x), metrics)

    def _train(self, session: _Session, plan: _Plan, rng: np.random.Generator) -> tuple[float, int]:
        """Run the local epochs; return the last epoch's mean loss and the steps taken."""
        n = len(self._x)
        loss_sum, seen, steps = 0.0, 0, 0
        for _ in range(plan.epochs):
            loss_sum, seen = 0.0, 0
            # The TorchScript trainer's batches: ceil(n / batch) near-equal parts.
            for idx in epoch_batches(n, plan.batch_size, rng):
                loss_sum += session.step(self._x[idx], self._y[idx]) * len(idx)
                seen += len(idx)
                steps += 1
        return loss_sum / max(seen, 1), steps
