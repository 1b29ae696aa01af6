"""SCAFFOLD on a device: the gradient correction, and the control variate it keeps.

Karimireddy et al. (2020), option II: every local step's gradient gets
``c - c_i`` added (``c`` the server's control variate, from the task's
strategy state; ``c_i`` this device's own, kept between rounds, zero at
first), and after training ``c_i`` moves to ``c_i - c + (x - y) / (K lr)``;
the update carries the move as ``control_delta/<name>`` tensors. Every
trainer that honours ``training.scaffold`` uses this one class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from broker import TrainTask, decode_weights
from device_sdk.app import DeviceContext

__all__ = ["STATE_ARTIFACT", "ScaffoldControl"]

STATE_ARTIFACT = "strategy_state.safetensors"
"""The strategy's saved server state (SCAFFOLD's control variate ``control/<name>``)."""


class ScaffoldControl:
    """One device's SCAFFOLD state across rounds."""

    def __init__(self) -> None:
        self._c: dict[str, np.ndarray] = {}
        self._c_i: dict[str, np.ndarray] = {}

    def correction(self, task: TrainTask, ctx: DeviceContext) -> dict[str, np.ndarray]:
        """Return the gradient correction ``c - c_i`` per parameter for this task."""
        server: dict[str, np.ndarray] = {}
        if STATE_ARTIFACT in task.artifacts:
            state = decode_weights(ctx.artifact(STATE_ARTIFACT))
            server = {
                k.removeprefix("control/"): v for k, v in state.items() if k.startswith("control/")
            }
        self._c = {
            k: server.get(k, np.zeros_like(w)).astype(np.float32) for k, w in ctx.weights.items()
        }
        self._c_i = self._c_i or {k: np.zeros_like(w) for k, w in ctx.weights.items()}
        return {k: self._c[k] - self._c_i[k] for k in ctx.weights}

    def delta(
        self,
        settings: Mapping[str, Any],
        start: Mapping[str, np.ndarray],
        end: Mapping[str, np.ndarray],
        steps: int,
    ) -> dict[str, np.ndarray]:
        """Move ``c_i`` after training; return the move as ``control_delta/<name>`` tensors."""
        scale = 1.0 / (max(steps, 1) * float(settings.get("lr", 0.05)))
        delta = {}
        for name, c_i in self._c_i.items():
            updated = c_i - self._c[name] + (start[name] - end[name]) * scale
            delta[f"control_delta/{name}"] = (updated - c_i).astype(np.float32)
            self._c_i[name] = updated.astype(np.float32)
        return delta
