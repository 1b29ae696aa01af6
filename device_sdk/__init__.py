"""The FedMQ device SDK: check in, pull the model, train locally, push the update."""

from device_sdk.app import DeviceApp, DeviceContext, TrainHandler, TrainResult
from device_sdk.client import DeviceClient, DeviceStats
from device_sdk.errors import DeviceError, TaskError, TrainingError
from device_sdk.fetch import ArtifactFetcher

__all__ = [
    "ArtifactFetcher",
    "DeviceApp",
    "DeviceClient",
    "DeviceContext",
    "DeviceError",
    "DeviceStats",
    "TaskError",
    "TrainHandler",
    "TrainResult",
    "TrainingError",
]
