"""Errors of the coordination service and the aggregator.

::

    ServiceError
    ├── ConfigError          an experiment config that cannot run (bad names, ranges)
    ├── NotFound             no such experiment, round, device or model version
    ├── Conflict             the request clashes with the current state
    ├── Unauthorized         a state-changing call without the admin token
    └── Forbidden            an expired or tampered signed URL
"""

from __future__ import annotations

from collections.abc import Sequence


class ServiceError(Exception):
    """Root of the service's errors; ``code`` is the stable string the API reports."""

    code = "service_error"


class ConfigError(ServiceError):
    """An experiment config that cannot be run; ``problems`` lists every reason, one per line."""

    code = "invalid_config"

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) or [message]


class NotFound(ServiceError):
    """The named experiment, round, device or model version does not exist."""

    code = "not_found"


class Conflict(ServiceError):
    """The request clashes with the current state."""

    code = "conflict"


class Unauthorized(ServiceError):
    """A state-changing call without a valid admin token."""

    code = "unauthorized"


class Forbidden(ServiceError):
    """A signed URL that is expired, tampered with, or used for another method."""

    code = "forbidden"
