"""An emulated iOS device: evaluates and trains the package's ExecuTorch programs."""

from __future__ import annotations

import numpy as np

from device_sdk.app import TrainHandler
from device_sdk.emulator.fleet import TrainerFactory
from device_sdk.trainers.executorch import ExecuTorchTrainer, ProgramFiles
from ios_bridge.package import IOS_PREFIX

__all__ = ["ios_trainers"]


def ios_trainers(seed: int) -> TrainerFactory:
    """Return a factory of emulated iOS trainers sharing one folder of program files.

    Parameters
    ----------
    seed
        The experiment's seed; device ``i`` uses stream ``i``.

    Returns
    -------
    TrainerFactory
        ``(x, y, index) -> ExecuTorchTrainer`` on the task's ``ios/`` files.
    """
    files = ProgramFiles()

    def make(x: np.ndarray, y: np.ndarray, index: int) -> TrainHandler:
        return ExecuTorchTrainer(x, y, seed=seed, stream=index, prefix=IOS_PREFIX, files=files)

    return make
