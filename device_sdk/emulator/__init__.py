"""The emulated device fleet: the real SDK, many devices, one process."""

from device_sdk.emulator.fleet import Fleet, TrainerFactory, device_name, torchscript_trainers

__all__ = ["Fleet", "TrainerFactory", "device_name", "torchscript_trainers"]
