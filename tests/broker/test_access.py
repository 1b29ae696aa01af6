"""broker.access without a broker: URLs, credentials and the permissions each role gets.

The brokers' own enforcement is tested in tests/e2e/test_broker_access.py.
"""

from __future__ import annotations

import re

import pytest

import broker.access
from broker.access import DeviceCredentials, open_access
from broker.access._common import AdminUrl, device_username, server_username
from broker.access.mosquitto import device_acls, server_acls
from broker.access.rabbitmq import device_permissions, server_permissions
from broker.errors import AccessError
from broker.topics import Topics

T = Topics("fedmq")


def test_the_public_surface_is_small() -> None:
    assert broker.access.__all__ == [
        "ACCESS_ALIASES",
        "BrokerAccess",
        "DeviceCredentials",
        "open_access",
    ]


def test_credentials_hide_the_password_and_go_into_a_url() -> None:
    credentials = DeviceCredentials("fedmq.d1", "p@ss/w:rd")

    url = credentials.url_for("mqtt://old:secret@broker:1883?protocol=3.1.1")

    assert "p@ss" not in repr(credentials)
    assert url == "mqtt://fedmq.d1:p%40ss%2Fw%3Ard@broker:1883?protocol=3.1.1"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://admin:hunter2@host/",
        "rabbitmq-http://host:15672/",
        "rabbitmq-http://admin:hunter2@host:15672/?colour=red",
        "rabbitmq-http://admin:hunter2@host:15672/?namespace=a.b",
        "rabbitmq-http://admin:hunter2@127.0.0.1:9/",
    ],
)
def test_bad_or_unreachable_urls_fail_without_showing_the_password(url: str) -> None:
    with pytest.raises(AccessError) as raised:
        open_access(url)

    assert "hunter2" not in str(raised.value)


def test_user_names_keep_namespaces_apart() -> None:
    assert device_username("fedmq", "d1") == "fedmq.d1"
    assert server_username("fedmq", "svc") == "fedmq.server.svc"
    with pytest.raises(AccessError):
        device_username("fedmq", "d1/#")
    assert (
        AdminUrl.parse("mosquitto-dynsec://a:b@h:1883?namespace=lab", frozenset()).namespace
        == "lab"
    )


def test_a_devices_rabbitmq_topic_permissions_name_only_its_own_keys() -> None:
    _, topic = device_permissions(T, "A")
    write, read = re.compile(topic["write"]), re.compile(topic["read"])

    assert write.match("fedmq.checkin.A") and write.match("fedmq.updates.exp-1.A")
    for key in ("fedmq.checkin.B", "fedmq.checkin.AB", "fedmq.updates.e.B", "fedmq.updates.e.f.A"):
        assert not write.match(key), key
    assert read.match("fedmq.device.A")
    for key in ("fedmq.device.B", "fedmq.device.*", "fedmq.#", "#"):
        assert not read.match(key), key


def test_a_devices_rabbitmq_resources_exclude_shared_queues() -> None:
    with_amqp, _ = device_permissions(T, "A")
    mqtt_only, _ = device_permissions(T, "A", amqp=False)
    configure = re.compile(with_amqp["configure"])

    assert configure.match("fedmq.sub.0123abcd") and configure.match("mqtt-subscription-Aqos1")
    shared = ("fedmq", "fedmq.dlx", "fedmq.dead-letters", "fedmq.group.fedmq-aggregators")
    for name in (*shared, "mqtt-subscription-Bqos1", "amq.default"):
        assert not configure.match(name), name
    assert not re.match(mqtt_only["configure"], "fedmq")


def test_the_server_role_covers_the_namespace_only() -> None:
    vhost, topic = server_permissions("fedmq")

    assert re.match(vhost["configure"], "fedmq.group.fedmq-aggregators")
    assert re.match(topic["read"], "fedmq.updates.*.*")
    assert re.match(topic["write"], "fedmq.dead-letters.fedmq.updates.e.A")
    assert not re.match(topic["write"], "other.updates.e.A")


def test_a_devices_mosquitto_role_allows_its_topics_then_denies_the_rest() -> None:
    acls = device_acls(T, "A")
    allowed = {(a["acltype"], a["topic"]) for a in acls if a["allow"]}

    assert allowed == {
        ("publishClientSend", "fedmq/checkin/A"),
        ("publishClientSend", "fedmq/updates/+/A"),
        ("subscribeLiteral", "fedmq/device/A"),
        ("unsubscribeLiteral", "fedmq/device/A"),
        ("publishClientReceive", "fedmq/device/A"),
    }
    assert all(
        a["priority"] < min(b["priority"] for b in acls if b["allow"])
        for a in acls
        if not a["allow"]
    )
    assert {a["topic"] for a in server_acls("fedmq")} == {
        "fedmq/#",
        "$share/+/fedmq/#",
        "fedmq/dead-letters/fedmq/#",
    }
