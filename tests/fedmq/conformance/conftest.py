"""Shared setup of the conformance kit's tests: the broker, the kit's models, fast timeouts."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from fedmq.conformance import KitModel, KitOptions
from tests.brokers import MQTT_PORT, mqtt_url, require

FAST = KitOptions(timeout_s=8.0, settle_s=0.2, come_back_after_s=0.5, come_back_grace_s=4.0)
"""Timeouts for devices on this machine: tasks train in well under a second."""


@pytest.fixture(scope="session")
def broker_url() -> str:
    """Return the shared Mosquitto's URL (each run uses a namespace of its own)."""
    require(MQTT_PORT, "Mosquitto")
    return mqtt_url()


@pytest.fixture(scope="session")
def kit_model() -> Callable[[str], KitModel]:
    """Return the kit's model for a platform, built once per session (a package takes seconds)."""
    built: dict[str, KitModel] = {}

    def model(platform: str) -> KitModel:
        if platform not in built:
            built[platform] = KitModel.build(platform)
        return built[platform]

    return model


def fresh_namespace() -> str:
    """Return a topic namespace no other test uses."""
    return f"conformance-{uuid.uuid4().hex[:10]}"


def fresh_device_id() -> str:
    """Return a device id (an MQTT client id) no other run uses: the kit takes its connection."""
    return f"dut-{uuid.uuid4().hex[:10]}"
