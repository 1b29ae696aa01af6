"""Local trainers a device app can register as its ``on_train`` handler."""

from device_sdk.trainers.torchscript import TorchScriptTrainer

__all__ = ["TorchScriptTrainer"]
