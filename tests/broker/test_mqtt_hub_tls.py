"""The MQTT hub over TLS, on the private Mosquitto and certificates of ``test_tls``."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from broker.errors import TlsError
from broker.mqtt_hub import MqttHub
from tests.broker.conftest import wait_until
from tests.broker.test_tls import (  # noqa: F401  (the module's fixtures)
    Inbox,
    Pki,
    TlsMosquitto,
    mosquitto,
    pki,
)


@pytest.fixture
def hub() -> Iterator[MqttHub]:
    hub = MqttHub(name="test-tls-hub")
    yield hub
    hub.close()


def test_hub_clients_round_trip_over_mqtts(
    hub: MqttHub,
    mosquitto: TlsMosquitto,  # noqa: F811  (the fixture imported above)
    pki: Pki,  # noqa: F811
) -> None:
    url = f"mqtts://127.0.0.1:{mosquitto.tls}?ca={pki.ca}"
    topic = f"test/hub-tls-{uuid.uuid4().hex[:8]}"
    clients = [hub.open(url, client_id=f"tls-{uuid.uuid4().hex[:8]}") for _ in range(20)]
    inbox = Inbox()
    clients[0].subscribe(topic, inbox)

    for i, client in enumerate(clients):
        client.publish(topic, str(i).encode())

    assert wait_until(lambda: len(inbox.bodies) == 20)


def test_a_broker_certificate_that_does_not_verify_fails_at_once(
    hub: MqttHub,
    mosquitto: TlsMosquitto,  # noqa: F811
    pki: Pki,  # noqa: F811
) -> None:
    client = hub.open(f"mqtts://device:s3cret@127.0.0.1:{mosquitto.tls}?ca={pki.stranger_ca}")
    start = time.monotonic()

    with pytest.raises(TlsError) as caught:
        client.publish("test/never", b"x")

    assert "does not verify" in str(caught.value) and "s3cret" not in str(caught.value)
    assert time.monotonic() - start < 3  # not connect_timeout's 5 s of retries
