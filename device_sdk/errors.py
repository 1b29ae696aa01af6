"""Errors of the device SDK.

::

    DeviceError
    ├── TrainingError        the local trainer could not train on the task
    └── TaskError            a task the device cannot serve (missing artifact, bad settings)

Fetch failures and checksum mismatches are ``broker.FetchError`` and
``broker.ChecksumMismatch``: the SDK fetches through the wire layer's rules.
"""

from __future__ import annotations


class DeviceError(Exception):
    """Root of the device SDK's errors; ``code`` travels in the error reply."""

    code = "device_error"


class TrainingError(DeviceError):
    """Local training failed."""

    code = "training_failed"


class TaskError(DeviceError):
    """The task cannot be served by this device."""

    code = "bad_task"
