"""The emulated Android device: trains the package's ExecuTorch program on ExecuTorch's runtime.

``android_ort_trainers`` keeps the legacy path: ONNX Runtime's training
artifacts, trained with no torch in the process.
"""

from __future__ import annotations

import numpy as np

from android_bridge.layout import ARTIFACT_PREFIX
from device_sdk.app import TrainHandler
from device_sdk.emulator.fleet import TrainerFactory
from device_sdk.trainers.executorch import ExecuTorchTrainer, ProgramFiles
from device_sdk.trainers.onnxruntime import OrtSessionCache, OrtTrainer

__all__ = ["android_ort_trainers", "android_trainers"]


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
        :class:`~device_sdk.trainers.executorch.ExecuTorchTrainer` on the
        task's ``android/`` files; the devices share one folder of them.
    """
    files = ProgramFiles()

    def make(x: np.ndarray, y: np.ndarray, index: int) -> TrainHandler:
        return ExecuTorchTrainer(x, y, seed=seed, stream=index, prefix=ARTIFACT_PREFIX, files=files)

    return make


def android_ort_trainers(seed: int) -> TrainerFactory:
    """Return a factory of legacy Android trainers on ONNX Runtime's training artifacts."""
    sessions = OrtSessionCache()

    def make(x: np.ndarray, y: np.ndarray, index: int) -> TrainHandler:
        return OrtTrainer(x, y, seed=seed, stream=index, prefix=ARTIFACT_PREFIX, sessions=sessions)

    return make
