"""Train a task's ExecuTorch training program on local data, as a phone's app does.

The program (``training.pte``), the inference program and the round's
weights file (``weights.ptd``) come with the task under a platform prefix
(``android/``, ``ios/``). They run on ExecuTorch's runtime through its Python
bindings: the same C++ ``TrainingModule`` and SGD an Android or iOS app
embeds, so an emulated phone meets the runtime's behaviour, not torch's.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from broker import TrainTask
from device_sdk.app import DeviceContext, TrainResult
from device_sdk.errors import TaskError, TrainingError
from device_sdk.trainers.batches import epoch_batches, local_data, round_rng
from device_sdk.trainers.scaffold import ScaffoldControl

__all__ = ["EXECUTORCH_ARTIFACTS", "ExecuTorchTrainer", "ProgramFiles"]

TRAINING_PROGRAM = "training.pte"
INFERENCE_PROGRAM = "inference.pte"
WEIGHTS_DATA = "weights.ptd"
MANIFEST = "package.json"
#: The artifacts a task carries under the trainer's prefix. The names are
#: ``model_store.export.executorch``'s, repeated because ``device_sdk`` may not
#: import ``model_store``; a test holds them equal.
EXECUTORCH_ARTIFACTS = (TRAINING_PROGRAM, INFERENCE_PROGRAM, WEIGHTS_DATA, MANIFEST)
#: The programs' method, and what the weights file's keys add to parameter names.
METHOD = "forward"
KEY_PREFIX = "net."

# One task at a time on the runtime in a process. Its first kernel call sets up
# a thread pool under a static-initialisation guard and logs through Python's
# stdout, which needs the GIL: a second thread entering the runtime with the
# GIL held meanwhile deadlocks both (seen in a fleet's first round). The
# bindings hold the GIL while they run, so tasks never ran side by side anyway.
_RUNTIME = threading.Lock()


class ProgramFiles:
    """Program and weights files on disk, by sha256, in a private temporary folder.

    The runtime loads from paths: a program loaded from a buffer keeps a raw
    pointer into it, which Python would free under it.

    Parameters
    ----------
    keep
        Weights files kept (a fleet's devices share a round's file); programs
        are few and all kept.
    """

    def __init__(self, *, keep: int = 8) -> None:
        self._keep = keep
        self._lock = threading.Lock()
        self._root = tempfile.TemporaryDirectory(prefix="fedmq-executorch-")
        self._weights: OrderedDict[str, Path] = OrderedDict()

    def program(self, data: bytes) -> Path:
        """Return the path of a program file with these bytes, writing it once."""
        with self._lock:
            return self._write(data, ".pte")

    def weights(self, data: bytes) -> Path:
        """Return the path of a weights file with these bytes, keeping the newest few."""
        with self._lock:
            path = self._write(data, ".ptd")
            self._weights[path.name] = path
            self._weights.move_to_end(path.name)
            while len(self._weights) > self._keep:
                # Called under the runtime lock: no device is about to load it, and
                # one that loaded it has its contents.
                self._weights.popitem(last=False)[1].unlink(missing_ok=True)
            return path

    def _write(self, data: bytes, suffix: str) -> Path:
        path = Path(self._root.name, hashlib.sha256(data).hexdigest() + suffix)
        if not path.exists():
            partial = path.with_suffix(".partial")
            partial.write_bytes(data)
            partial.replace(path)  # a file that exists is complete
        return path


@dataclass(frozen=True)
class _Plan:
    """The training settings the runtime's SGD honours."""

    epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    proximal_mu: float


def _plan(settings: dict[str, Any], max_batch: int) -> _Plan:
    """Read the task's settings; refuse, naming it, any the program cannot honour."""
    optimizer = str(settings.get("optimizer", "sgd"))
    if optimizer != "sgd":
        raise TaskError(
            f"training.optimizer={optimizer!r} is not supported: ExecuTorch's training "
            "runtime offers SGD only"
        )
    try:
        plan = _Plan(
            epochs=int(settings.get("epochs", 1)),
            batch_size=int(settings.get("batch_size", 32)),
            lr=float(settings.get("lr", 0.05)),
            momentum=float(settings.get("momentum", 0.0)),
            weight_decay=float(settings.get("weight_decay", 0.0)),
            proximal_mu=float(settings.get("proximal_mu", 0.0)),
        )
    except (TypeError, ValueError) as exc:
        raise TaskError(f"bad training settings: {exc}") from exc
    numbers = (plan.lr, plan.momentum, plan.weight_decay, plan.proximal_mu)
    if plan.epochs < 1 or plan.batch_size < 1 or not all(map(math.isfinite, numbers)):
        raise TaskError(f"bad training settings: {plan}")
    if plan.lr <= 0 or min(plan.momentum, plan.weight_decay, plan.proximal_mu) < 0:
        raise TaskError(f"bad training settings: {plan}")
    if plan.batch_size > max_batch:
        raise TaskError(
            f"training.batch_size={plan.batch_size} exceeds the program's largest batch "
            f"({max_batch}); export it with a larger --max-batch"
        )
    return plan


class ExecuTorchTrainer:
    """A training handler: SGD through the ExecuTorch runtime, with FedProx and SCAFFOLD.

    It trains as :class:`~device_sdk.trainers.TorchScriptTrainer` does with
    SGD (the same batches in the same order; momentum, weight decay, FedProx's
    proximal term and SCAFFOLD's correction; the same metrics: ``loss``,
    ``loss_before``, ``local_steps``), from the task's ExecuTorch files.

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
        The files' name prefix in the task (``"android/"`` or ``"ios/"``).
    files
        Where program and weights files are written; share one across a fleet.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        seed: int = 0,
        stream: int | None = None,
        prefix: str = "android/",
        files: ProgramFiles | None = None,
    ) -> None:
        self._x, self._y = local_data(x, y)
        self._seed = seed
        self._stream = stream
        self._prefix = prefix
        self._files = files or ProgramFiles()
        self._scaffold = ScaffoldControl()

    def __call__(self, task: TrainTask, ctx: DeviceContext) -> TrainResult:
        """Train from the round's weights file; return the new weights by parameter name."""
        max_batch = self._max_batch(ctx)
        plan = _plan(dict(task.training), max_batch)
        data = {
            name: ctx.artifact(self._prefix + name)
            for name in (WEIGHTS_DATA, INFERENCE_PROGRAM, TRAINING_PROGRAM)
        }
        rng = round_rng(self._seed, task.round, self._stream, ctx.device_id)
        correction = self._scaffold.correction(task, ctx) if task.training.get("scaffold") else {}
        with _RUNTIME:
            # Files are written, and old weights files removed, only while no other
            # device of the process is between writing its files and loading them.
            weights = self._files.weights(data[WEIGHTS_DATA])
            inference = self._files.program(data[INFERENCE_PROGRAM])
            training = self._files.program(data[TRAINING_PROGRAM])
            loss_before = self._mean_loss(inference, weights, max_batch)
            loss, steps, trained = self._train(
                training, weights, plan, rng, ctx.weights, correction
            )
        if not math.isfinite(loss):
            raise TrainingError(f"training diverged (loss {loss})")
        if correction:
            trained.update(self._scaffold.delta(task.training, ctx.weights, trained, steps))
        metrics = {"loss": loss, "loss_before": loss_before, "local_steps": float(steps)}
        return TrainResult(trained, len(self._x), metrics)

    def _max_batch(self, ctx: DeviceContext) -> int:
        try:
            manifest = json.loads(ctx.artifact(self._prefix + MANIFEST))
            return int(manifest["executorch"]["max_batch"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TaskError(f"the package manifest lacks executorch.max_batch: {exc}") from exc

    def _mean_loss(self, program: Path, weights: Path, max_batch: int) -> float:
        """Return the inference program's mean cross-entropy on the local data."""
        import torch

        module = _load(program, weights)
        total = 0.0
        try:
            for start in range(0, len(self._x), max_batch):
                x = torch.from_numpy(self._x[start : start + max_batch])
                logits = module.forward((x,))[0].numpy().astype(np.float64)
                total += _cross_entropy_sum(logits, self._y[start : start + max_batch])
        except RuntimeError as exc:
            raise TaskError(f"the inference program does not run on this data: {exc}") from exc
        return total / len(self._x)

    def _train(
        self,
        program: Path,
        weights: Path,
        plan: _Plan,
        rng: np.random.Generator,
        model: Mapping[str, np.ndarray],
        correction: Mapping[str, np.ndarray],
    ) -> tuple[float, int, dict[str, np.ndarray]]:
        """Run the local epochs; return the last epoch's mean loss, the steps and the weights.

        The weights file must hold the task's ``model`` exactly (checked once the
        runtime names its parameters); the weights come back by parameter name.
        FedProx's term and SCAFFOLD's ``correction`` are added to the runtime's
        gradients, in place, before each step.
        """
        import torch

        anchor = {KEY_PREFIX + k: torch.from_numpy(v) for k, v in model.items()}
        shift = {KEY_PREFIX + k: torch.from_numpy(v) for k, v in correction.items()}

        training = _runtime("executorch.extension.training")
        module = training.TrainingModule(_load(program, weights))
        optimizer = None
        n = len(self._x)
        loss_sum, seen, steps = 0.0, 0, 0
        try:
            for _ in range(plan.epochs):
                loss_sum, seen = 0.0, 0
                for idx in epoch_batches(n, plan.batch_size, rng):
                    x, y = torch.from_numpy(self._x[idx]), torch.from_numpy(self._y[idx])
                    loss = module.forward_backward(METHOD, (x, y))[0]
                    if optimizer is None:
                        # The runtime names its parameters only once a method has run.
                        parameters = module.named_parameters()
                        _check_start(parameters, model)
                        optimizer = training.get_sgd_optimizer(
                            parameters, plan.lr, plan.momentum, 0.0, plan.weight_decay, False
                        )
                    gradients = module.named_gradients()
                    for key, gradient in gradients.items():
                        if plan.proximal_mu > 0:  # FedProx: stay near the round's model
                            gradient.add_(parameters[key] - anchor[key], alpha=plan.proximal_mu)
                        if key in shift:  # SCAFFOLD: g - c_i + c
                            gradient.add_(shift[key])
                    optimizer.step(gradients)
                    loss_sum += float(loss) * len(idx)
                    seen += len(idx)
                    steps += 1
        except RuntimeError as exc:
            raise TrainingError(f"an ExecuTorch training step failed: {exc}") from exc
        trained = {
            name.removeprefix(KEY_PREFIX): value.detach().numpy().copy()
            for name, value in module.named_parameters().items()
        }
        return loss_sum / max(seen, 1), steps, trained


def _check_start(parameters: Mapping[str, Any], model: Mapping[str, np.ndarray]) -> None:
    """Refuse a weights file that does not hold the task's model: training would start elsewhere."""
    names = {name.removeprefix(KEY_PREFIX): name for name in parameters}
    if set(names) != set(model):
        raise TaskError(
            f"the program trains {sorted(names)}, the task's model holds {sorted(model)}"
        )
    for name, key in names.items():
        if not np.array_equal(parameters[key].detach().numpy(), model[name]):
            raise TaskError(
                f"the task's weights file holds other values of {name!r} than its model: "
                "a weights file of another version"
            )


def _load(program: Path, weights: Path) -> Any:
    """Load a program with its weights file through the runtime's bindings."""
    bindings = _runtime("executorch.extension.pybindings.portable_lib")
    try:
        return bindings._load_for_executorch(str(program), data_path=str(weights))
    except RuntimeError as exc:
        raise TaskError(f"the ExecuTorch program does not load: {exc}") from exc


def _runtime(module: str) -> Any:
    """Import part of ExecuTorch's bindings, or refuse the task saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise TaskError(
            "this device has no ExecuTorch runtime: install it with "
            f"`pip install --no-deps executorch==1.5.1 ruamel.yaml tabulate` ({exc})"
        ) from exc


def _cross_entropy_sum(logits: np.ndarray, labels: np.ndarray) -> float:
    """Return the summed cross-entropy of float64 logits against class labels."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].sum())
