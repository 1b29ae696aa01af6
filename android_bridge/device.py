"""The emulated Android device: trains the package's ONNX Runtime artifacts, never torch."""

from __future__ import annotations

import numpy as np

from android_bridge.layout import ARTIFACT_PREFIX
from device_sdk.app import TrainHandler
from device_sdk.emulator.fleet import TrainerFactory
from device_sdk.trainers.onnxruntime import OrtSessionCache, OrtTrainer

__all__ = ["android_trainers"]


def android_trainers(seed: int) -> TrainerFactory:
    """Return a factory of Android trainers for an emulated fleet.

    Parameters
    ----------
    seed
        The experiment's seed; with the device's index it fixes the batch order.

    Returns
    -------
    TrainerFactory
        ``make(x, y, index)`` builds device ``index``'s
        :class:`~device_sdk.trainers.onnxruntime.OrtTrainer`, which reads the
        task's ``android/`` training artifacts. The devices share one
        loaded-session cache.
    """
    sessions = OrtSessionCache()

    def make(x: np.ndarray, y: np.ndarray, index: int) -> TrainHandler:
        return OrtTrainer(x, y, seed=seed, stream=index, prefix=ARTIFACT_PREFIX, sessions=sessions)

    return make
