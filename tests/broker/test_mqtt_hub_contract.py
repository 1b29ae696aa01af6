"""The transport contract again, with every MQTT connection a client of one ``MqttHub``."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from broker.mqtt_hub import MqttHub
from tests.broker.conftest import Bus
from tests.broker.test_transport_contract import (  # noqa: F401  (collected here with the hub's bus)
    test_a_group_keeps_messages_published_while_its_consumer_is_offline,
    test_a_requeued_message_comes_back_marked_redelivered,
    test_an_unsettled_message_is_redelivered_to_the_next_consumer,
    test_group_members_share_messages_and_plain_subscribers_get_copies,
    test_large_payloads_arrive_intact,
    test_published_messages_reach_a_subscriber_in_order,
    test_reconnect_listeners_run_after_a_drop_and_may_publish,
    test_the_transport_reconnects_after_the_broker_drops_it,
    test_wildcards_match_one_segment_or_the_rest,
)
from tests.brokers import MQTT_PORT, mqtt_url, require
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def bus() -> Iterator[Bus]:
    """Overrides the conftest's: the hub's transports only."""
    yield from _hub_bus()


@pytest.fixture
def network_bus() -> Iterator[Bus]:
    """Overrides the conftest's: the hub's transports only."""
    yield from _hub_bus()


def _hub_bus() -> Iterator[Bus]:
    require(MQTT_PORT, "Mosquitto")
    hub = MqttHub(name="test-hub")
    proxy = TcpProxy(MQTT_PORT)
    client_id = f"hub-contract-{uuid.uuid4().hex[:8]}"
    bus = Bus("mqtt", lambda: hub.open(mqtt_url(proxy.port), client_id=client_id), proxy=proxy)
    yield bus
    for transport in reversed(bus.opened):
        transport.close()
    hub.close()
    proxy.close()
