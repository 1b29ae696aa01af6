"""Topic names, in one place.

Topics are written with ``/`` separators, as MQTT wants them; the AMQP
transport turns ``/`` into ``.`` for routing keys, which is the same mapping
RabbitMQ's MQTT plugin applies, so one name serves both protocols.
"""

from __future__ import annotations

import re

_SEGMENT = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")

PREFIX = "fedmq"
CHECKINS = f"{PREFIX}/checkin"
"""Devices announce themselves here; the coordinator listens."""


def _segment(value: str) -> str:
    """Return ``value`` if it is safe as one topic segment, else raise ``ValueError``."""
    if not _SEGMENT.match(value):
        raise ValueError(f"{value!r} is not a valid topic segment (letters, digits, '_', '-')")
    return value


def device(device_id: str) -> str:
    """Return the topic a single device receives its tasks and replies on."""
    return f"{PREFIX}/device/{_segment(device_id)}"


def updates(experiment_id: str) -> str:
    """Return the topic devices publish an experiment's model updates to."""
    return f"{PREFIX}/updates/{_segment(experiment_id)}"


def control(experiment_id: str) -> str:
    """Return the topic the coordinator drives an experiment's aggregation on."""
    return f"{PREFIX}/control/{_segment(experiment_id)}"


def events(experiment_id: str) -> str:
    """Return the topic workers report an experiment's round outcomes on."""
    return f"{PREFIX}/events/{_segment(experiment_id)}"


def is_valid_segment(value: str) -> bool:
    """Return whether ``value`` may be used as a device or experiment id."""
    return bool(_SEGMENT.match(value))


ALL_UPDATES = f"{PREFIX}/updates/+"
"""Pattern matching every experiment's update topic."""
ALL_CONTROL = f"{PREFIX}/control/+"
"""Pattern matching every experiment's control topic."""
ALL_EVENTS = f"{PREFIX}/events/+"
"""Pattern matching every experiment's event topic."""
UPDATES_GROUP = "fedmq-aggregators"
"""The shared queue all aggregator workers consume updates from."""
