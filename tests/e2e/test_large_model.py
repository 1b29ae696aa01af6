"""A ~58 MB model runs a round over Mosquitto with default settings, weights by reference."""

from __future__ import annotations

import uuid
from typing import Any

from fedmq.compose import run_experiment
from fedmq.settings import Settings
from tests.brokers import MQTT_PORT, mqtt_url, require

HIDDEN = 196_000  # 64*h + h + 10*h + 10 = 14.5M float32 parameters, ~58 MB


def test_a_58_mb_model_round_goes_by_reference_over_mqtt(small_config: Any) -> None:
    require(MQTT_PORT, "Mosquitto")
    config = small_config(
        model={"hidden": [HIDDEN]},
        data={"devices": 2, "partition": "iid"},
        rounds={"count": 1, "devices_per_round": 2, "min_reports": 2},
        training={"batch_size": 128, "lr": 0.01},
    )

    # A namespace of its own: other runs may share this Mosquitto.
    settings = Settings(namespace=f"large{uuid.uuid4().hex[:8]}")
    result = run_experiment(config, broker_url=mqtt_url(), timeout_s=240, settings=settings)

    (record,) = result.rounds
    assert record.state == "committed" and len(record.accepted) == 2
    assert len(result.final_weights) > 50_000_000
    assert result.fleet["uploads"] == 2  # both updates uploaded, only references on the bus
    assert result.fleet["failures"] == 0
