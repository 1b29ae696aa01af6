"""Packaging a torch model for iOS, and an emulated iOS device.

An iOS package holds a TorchScript lite module that takes the weights as
inputs (LibTorch-Lite evaluates any round's weights with it), the ONNX
Runtime on-device training files, the initial weights and a manifest.
torch and ONNX Runtime are imported only when a package is built or a
device trains.

Errors follow the layer they come from: packaging raises ``model_store``'s
``ExportError``; the emulated device raises ``device_sdk``'s ``TaskError`` and
``TrainingError``, which its client turns into error replies.
"""

from ios_bridge.device import IosTrainer, LiteModuleCache, ios_trainers
from ios_bridge.manifest import FORMAT_VERSION
from ios_bridge.package import IOS_FILES, IOS_PREFIX, LITE_MODULE, build_ios_package, ios_artifacts

__all__ = [
    "FORMAT_VERSION",
    "IOS_FILES",
    "IOS_PREFIX",
    "LITE_MODULE",
    "IosTrainer",
    "LiteModuleCache",
    "build_ios_package",
    "ios_artifacts",
    "ios_trainers",
]
