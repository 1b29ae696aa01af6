"""The emulated device fleet: the real SDK, many devices, one process."""

from device_sdk.emulator.fleet import Fleet, device_name

__all__ = ["Fleet", "device_name"]
