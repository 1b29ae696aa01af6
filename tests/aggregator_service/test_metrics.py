"""/metrics parses with prometheus_client's own parser and its figures are the round records'."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from aggregator_service.api.app import create_app
from device_sdk.emulator import Fleet
from tests.identities import enroll_in

AUTH = {"Authorization": "Bearer t"}


@pytest.fixture
def client(stack: Any) -> Iterator[FlaskClient]:
    app = create_app({"TESTING": True, "ADMIN_TOKEN": "t"}, service=stack.service)
    with app.test_client() as client:
        yield client


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_the_counters_match_the_round_records_of_a_run(
    client: FlaskClient, stack: Any, small_config: Any
) -> None:
    strategy = {"name": "dpfedavg", "clip_norm": 1.0, "noise_multiplier": 0.5}
    config = small_config(strategy=strategy).to_dict()
    experiment_id = client.post("/api/v1/experiments", json=config, headers=AUTH).json["id"]
    Fleet(
        lambda _id, _will: stack.transport,
        config["data"],
        seed=config["seed"],
        experiment_id=experiment_id,
        enroll=enroll_in(stack.service),
    ).start()
    stack.transport.join(timeout=30)
    client.post(f"/api/v1/experiments/{experiment_id}/rounds", json={"count": 3}, headers=AUTH)
    stack.transport.join(timeout=60)

    samples = _samples(client.get("/metrics").get_data(as_text=True))

    records = stack.service.rounds(experiment_id)
    exp = (("experiment", experiment_id),)
    assert [r.state for r in records] == ["committed"] * 3
    assert samples[("fedmq_rounds", (*exp, ("state", "committed")))] == 3
    assert samples[("fedmq_rounds", (*exp, ("state", "abandoned")))] == 0
    accepted = sum(len(r.accepted) for r in records)
    assert accepted >= 12 and samples[("fedmq_updates_accepted_total", exp)] == accepted
    assert samples[("fedmq_round_duration_seconds_count", exp)] == 3
    total = sum(r.duration_s or 0.0 for r in records)
    assert samples[("fedmq_round_duration_seconds_sum", exp)] == pytest.approx(total)
    assert samples[("fedmq_privacy_epsilon", exp)] == records[-1].metrics["epsilon"] > 0
    assert samples[("fedmq_devices_online", ())] == len(stack.service.online_devices()) == 6
    assert samples[("fedmq_devices_registered", ())] == 6
