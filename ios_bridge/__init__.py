"""Packaging a torch model for iOS, and an emulated iOS device.

An iOS package holds ExecuTorch's training and inference programs with their
weights file (an app drives them through ExecuTorch's C++ training API from
Objective-C++ or Swift), ONNX Runtime's training files as a legacy format,
the initial weights and a manifest. torch is imported only when a package
is built or a device trains.

Errors follow the layer they come from: packaging raises ``model_store``'s
``ExportError``; the emulated device raises ``device_sdk``'s ``TaskError`` and
``TrainingError``, which its client turns into error replies.
"""

from ios_bridge.device import ios_trainers
from ios_bridge.package import IOS_FILES, IOS_PREFIX, build_ios_package, ios_artifacts
from model_store.export.mobile import MANIFEST_FORMAT_VERSION as FORMAT_VERSION

__all__ = [
    "FORMAT_VERSION",
    "IOS_FILES",
    "IOS_PREFIX",
    "build_ios_package",
    "ios_artifacts",
    "ios_trainers",
]
