"""Train the task's TorchScript artifact on local data: the device needs no model code."""

from __future__ import annotations

import hashlib
import io
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from broker import TrainTask
from device_sdk.app import DeviceContext, TrainResult
from device_sdk.errors import TaskError, TrainingError
from device_sdk.trainers.batches import epoch_batches, local_data, round_rng
from device_sdk.trainers.scaffold import ScaffoldControl

if TYPE_CHECKING:
    import torch

TORCHSCRIPT_ARTIFACT = "model.torchscript.pt"


class ModuleCache:
    """Loaded TorchScript modules by artifact hash, one copy per thread.

    A module is loaded once and reused across tasks and devices; each thread
    gets its own copy because training overwrites the module's parameters.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, data: bytes) -> torch.jit.ScriptModule:
        """Return the module serialised in ``data``, loading it on first use."""
        import torch

        cache: dict[str, Any] = self._local.__dict__.setdefault("modules", {})
        key = hashlib.sha256(data).hexdigest()
        if key not in cache:
            try:
                cache[key] = torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call]
            except RuntimeError as exc:
                raise TaskError(f"the TorchScript artifact does not load: {exc}") from exc
        module: torch.jit.ScriptModule = cache[key]
        return module


class TorchScriptTrainer:
    """A training handler: SGD or Adam with cross-entropy on the device's examples.

    Parameters
    ----------
    x, y
        The device's local examples and integer labels.
    seed
        Seeds the batch order together with ``stream`` and the round.
    stream
        Separates this device's random stream from others with the same seed
        (the fleet passes the device's partition index, so an emulated device
        trains identically in every process, whatever its id's prefix; default:
        derived from the device id).
    modules
        Loaded-module cache to share across a fleet.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        seed: int = 0,
        stream: int | None = None,
        modules: ModuleCache | None = None,
    ) -> None:
        self._x, self._y = local_data(x, y)
        self._seed = seed
        self._stream = stream
        self._modules = modules or ModuleCache()
        self._scaffold = ScaffoldControl()

    def __call__(self, task: TrainTask, ctx: DeviceContext) -> TrainResult:
        """Train the task's module from the global weights; return the new weights.

        Besides ``loss`` the result's metrics carry ``loss_before`` (the global
        model's loss on this device's data, for q-FFL) and ``local_steps`` (the
        optimizer steps taken, for FedNova). A positive ``proximal_mu`` in the
        task's training settings adds FedProx's proximal term.
        """
        import torch

        module = self._modules.get(ctx.artifact(TORCHSCRIPT_ARTIFACT))
        state = module.state_dict()
        if set(state) != set(ctx.weights):
            raise TaskError("the weights do not match the TorchScript module's parameters")
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.copy_(torch.from_numpy(ctx.weights[name]))
        x, y = torch.from_numpy(self._x), torch.from_numpy(self._y)
        loss_before = _mean_loss(module, x, y)
        rng = round_rng(self._seed, task.round, self._stream, ctx.device_id)
        correction = self._scaffold.correction(task, ctx) if task.training.get("scaffold") else {}
        loss, steps = self._train(module, task.training, x, y, rng, correction)
        if not np.isfinite(loss):
            raise TrainingError(f"training diverged (loss {loss})")
        new = {name: state[name].detach().numpy().copy() for name in ctx.weights}
        if correction:
            new.update(self._scaffold.delta(task.training, ctx.weights, new, steps))
        metrics = {"loss": loss, "loss_before": loss_before, "local_steps": float(steps)}
        return TrainResult(new, len(x), metrics)

    def _train(
        self,
        module: Any,
        settings: Any,
        x: torch.Tensor,
        y: torch.Tensor,
        rng: np.random.Generator,
        correction: dict[str, np.ndarray],
    ) -> tuple[float, int]:
        """Run the local epochs; return the last epoch's mean loss and the steps taken."""
        import torch

        optimizer = _optimizer(module, settings)
        epochs = int(settings.get("epochs", 1))
        batch = int(settings.get("batch_size", 32))
        mu = float(settings.get("proximal_mu", 0.0))
        named = list(module.named_parameters())
        params = [p for _, p in named]
        anchor = [p.detach().clone() for p in params] if mu > 0 else []
        shift = [torch.from_numpy(correction[n]) for n, _ in named] if correction else []
        module.train()
        loss_sum, seen, steps = 0.0, 0, 0
        for _ in range(epochs):
            loss_sum, seen = 0.0, 0
            for idx in epoch_batches(len(x), batch, rng):
                index = torch.from_numpy(idx)
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(module(x[index]), y[index])
                objective = loss
                if mu > 0:  # FedProx: keep local weights near the global ones
                    drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    objective = loss + mu / 2 * drift
                objective.backward()  # type: ignore[no-untyped-call]
                for p, c in zip(params, shift, strict=False):  # SCAFFOLD: g - c_i + c
                    if p.grad is not None:
                        p.grad += c
                optimizer.step()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
                steps += 1
        return loss_sum / max(seen, 1), steps


def _mean_loss(module: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """Return the module's mean cross-entropy on ``x, y`` without training."""
    import torch

    module.eval()
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(module(x), y))


def _optimizer(module: Any, settings: Any) -> torch.optim.Optimizer:
    """Build the optimizer a task's training settings name."""
    import torch

    name = str(settings.get("optimizer", "sgd"))
    lr = float(settings.get("lr", 0.05))
    decay = float(settings.get("weight_decay", 0.0))
    if name == "sgd":
        momentum = float(settings.get("momentum", 0.0))
        return torch.optim.SGD(module.parameters(), lr=lr, momentum=momentum, weight_decay=decay)
    if name == "adam":
        return torch.optim.Adam(module.parameters(), lr=lr, weight_decay=decay)
    raise TaskError(f"unknown optimizer {name!r}")
