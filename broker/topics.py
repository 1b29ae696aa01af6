"""Topic names, in one place, under a deployment's namespace.

Topics are written with ``/`` separators, as MQTT wants them; the AMQP
transport turns ``/`` into ``.`` for routing keys, which is the same mapping
RabbitMQ's MQTT plugin applies, so one name serves both protocols.

Every topic a device may publish to ends in its own id (``NS/checkin/D``,
``NS/updates/E/D``) and it reads only ``NS/device/D``, so one broker ACL
pattern per role confines each device to its own traffic. The namespace
(``FEDMQ_NAMESPACE``, default ``fedmq``) prefixes every topic and names the
worker group, so deployments sharing a broker never see each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SEGMENT = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")

DEFAULT_NAMESPACE = "fedmq"


def _segment(value: str) -> str:
    """Return ``value`` if it is safe as one topic segment, else raise ``ValueError``."""
    if not isinstance(value, str) or not _SEGMENT.match(value):
        raise ValueError(f"{value!r} is not a valid topic segment (letters, digits, '_', '-')")
    return value


def is_valid_segment(value: object) -> bool:
    """Return whether ``value`` may be used as a device, experiment or namespace id."""
    return isinstance(value, str) and bool(_SEGMENT.match(value))


@dataclass(frozen=True)
class Topics:
    """The topics of one deployment (one namespace)."""

    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        _segment(self.namespace)

    def checkin(self, device_id: str) -> str:
        """Return the topic a device announces itself (and leaves) on."""
        return f"{self.namespace}/checkin/{_segment(device_id)}"

    @property
    def all_checkins(self) -> str:
        """Return the pattern matching every device's check-in topic."""
        return f"{self.namespace}/checkin/+"

    def device(self, device_id: str) -> str:
        """Return the topic a single device receives its tasks and replies on."""
        return f"{self.namespace}/device/{_segment(device_id)}"

    @property
    def all_devices(self) -> str:
        """Return the pattern matching every device's topic."""
        return f"{self.namespace}/device/+"

    def updates(self, experiment_id: str, device_id: str) -> str:
        """Return the topic a device publishes an experiment's model updates to."""
        return f"{self.namespace}/updates/{_segment(experiment_id)}/{_segment(device_id)}"

    @property
    def all_updates(self) -> str:
        """Return the pattern matching every experiment's update topics."""
        return f"{self.namespace}/updates/+/+"

    def control(self, experiment_id: str) -> str:
        """Return the topic the coordinator drives an experiment's aggregation on."""
        return f"{self.namespace}/control/{_segment(experiment_id)}"

    @property
    def all_control(self) -> str:
        """Return the pattern matching every experiment's control topic."""
        return f"{self.namespace}/control/+"

    def events(self, experiment_id: str) -> str:
        """Return the topic workers report an experiment's round outcomes on."""
        return f"{self.namespace}/events/{_segment(experiment_id)}"

    @property
    def all_events(self) -> str:
        """Return the pattern matching every experiment's event topic."""
        return f"{self.namespace}/events/+"

    def combine(self, experiment_id: str) -> str:
        """Return the topic the coordinator asks one worker to combine a closed round on."""
        return f"{self.namespace}/combine/{_segment(experiment_id)}"

    @property
    def all_combine(self) -> str:
        """Return the pattern matching every experiment's combine topic."""
        return f"{self.namespace}/combine/+"

    @staticmethod
    def combiners_group(updates_group: str) -> str:
        """Return the shared queue handing each combine request to one of a worker group."""
        return f"{updates_group}-combine"

    @property
    def workers(self) -> str:
        """Return the topic workers say they are alive on."""
        return f"{self.namespace}/workers"

    @property
    def updates_group(self) -> str:
        """Return the shared queue this deployment's aggregator workers consume updates from."""
        return f"{self.namespace}-aggregators"
