"""What a device application registers: its training handler, typed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from broker import ModelRef, TrainTask
from device_sdk.errors import TaskError
from device_sdk.fetch import ArtifactFetcher


@dataclass(frozen=True)
class TrainResult:
    """What a training handler returns: new weights, how many examples, local metrics."""

    weights: Mapping[str, np.ndarray]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass
class DeviceContext:
    """What a handler may use while serving a task: identity, global weights, artifacts."""

    device_id: str
    weights: dict[str, np.ndarray]
    artifact_refs: Mapping[str, ModelRef]
    fetcher: ArtifactFetcher

    def artifact(self, name: str) -> bytes:
        """Return an artifact of the task (fetched once, checksum-verified)."""
        ref = self.artifact_refs.get(name)
        if ref is None:
            raise TaskError(
                f"task carries no artifact {name!r}; it has {sorted(self.artifact_refs)}"
            )
        return self.fetcher.fetch(ref)


TrainHandler = Callable[[TrainTask, DeviceContext], TrainResult]


class DeviceApp:
    """A device application: register the training handler with ``@app.on_train``."""

    def __init__(self) -> None:
        self.train_handler: TrainHandler | None = None

    def on_train(self, handler: TrainHandler) -> TrainHandler:
        """Register ``handler`` as the device's trainer (decorator)."""
        self.train_handler = handler
        return handler
