"""The lean MQTT receive path: the same messages as paho's own, from any split of the bytes."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import paho.mqtt.client as paho
import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker._mqtt_receive import LeanClient, MalformedPublish, split_publish


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _props(**values: object) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for name, value in values.items():
        setattr(props, name, value)
    return props


def publish_packet(
    topic: bytes,
    payload: bytes,
    *,
    qos: int = 1,
    mid: int = 7,
    dup: bool = False,
    retain: bool = False,
    props: Properties | None = None,
) -> bytes:
    """Return one PUBLISH packet as a broker sends it (``props`` only under MQTT 5)."""
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if props is not None:
        body += props.pack()  # type: ignore[no-untyped-call]
    body += payload
    header = 0x30 | (0x08 if dup else 0) | (qos << 1) | (0x01 if retain else 0)
    return bytes([header]) + _varint(len(body)) + body


SHAPES = {
    "mqtt3 qos0": (False, dict(qos=0)),
    "mqtt3 qos1 dup retain": (False, dict(qos=1, dup=True, retain=True, mid=65535)),
    "mqtt5 no properties": (True, dict(props=_props())),
    "mqtt5 redelivery mark and subscription ids": (
        True,
        dict(props=_props(UserProperty=("fedmq-redelivered", "1"), SubscriptionIdentifier=3)),
    ),
    "mqtt5 qos0 with a long property": (True, dict(qos=0, props=_props(ContentType="x" * 300))),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("size", [0, 5, 200_000])
def test_split_equals_paho(shape: str, size: int) -> None:
    mqtt5, options = SHAPES[shape]
    payload = os.urandom(size)
    packet = publish_packet(b"fedmq/ns/updates/e/d1", payload, **options)  # type: ignore[arg-type]
    header, body = packet[0], _after_fixed_header(packet)
    protocol = MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311
    theirs = _packet.decode_publish(header, bytearray(body), protocol)
    ours = split_publish(header, bytearray(body), mqtt5)
    assert (ours.dup, ours.qos, ours.retain, ours.topic, ours.mid, ours.payload) == (
        theirs.dup,
        theirs.qos,
        theirs.retain,
        theirs.topic,
        theirs.mid,
        bytes(theirs.payload),
    )
    assert str(ours.properties) == str(theirs.properties)
    assert type(ours.payload) is bytes


def _after_fixed_header(packet: bytes) -> bytes:
    i = 1
    while packet[i] & 0x80:
        i += 1
    return packet[i + 1 :]


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no topic length
        b"\x00\x09short",  # a topic longer than the packet
        b"\x00\x01t",  # QoS 1 without its packet id
        b"\x00\x01t\x00\x01\xff\xff\xff\xff\x01",  # a five-byte property length
        b"\x00\x01t\x00\x01\x20",  # properties beyond the packet
        b"\x00\x01t\x00\x01\x02\x7f\x00",  # an unknown property
        b"\x00\x01t\x00\x01\x01\x01",  # a property length that leaves out its value
        b"\x00\x01t\x00\x01\x02\x23\x00",  # a two-byte property cut short
    ],
)
def test_malformed_publish_is_refused(body: bytes) -> None:
    with pytest.raises(MalformedPublish):
        split_publish(0x32, body, True)


def test_qos_3_is_malformed() -> None:
    with pytest.raises(MalformedPublish):
        split_publish(0x36, b"\x00\x01t\x00\x01\x00payload", True)


def test_an_empty_topic_is_malformed_under_mqtt3() -> None:
    with pytest.raises(MalformedPublish):
        split_publish(0x30, b"\x00\x00payload", False)


@pytest.fixture
def wired() -> Iterator[tuple[LeanClient, socket.socket, list[paho.MQTTMessage]]]:
    """A lean client reading from one end of a socket pair; the test writes the other."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = LeanClient(
        CallbackAPIVersion.VERSION2,
        client_id="lean",
        protocol=MQTTProtocolVersion.MQTTv5,
        manual_ack=True,
    )
    got: list[paho.MQTTMessage] = []
    client.on_message = lambda _c, _u, message: got.append(message)
    client._sock = ours  # as paho's connect leaves it
    yield client, theirs, got
    ours.close()
    theirs.close()


def _drain(client: LeanClient) -> MQTTErrorCode:
    while True:
        rc = client._packet_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return rc


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 40, 65_536, 100_001])
def test_a_packet_split_anywhere_arrives_whole(
    wired: tuple[LeanClient, socket.socket, list[paho.MQTTMessage]], cut: int
) -> None:
    client, peer, got = wired
    payloads = [os.urandom(150_000), b"", os.urandom(3)]
    stream = b"".join(
        publish_packet(f"t/{i}".encode(), p, mid=i + 1, props=_props(SubscriptionIdentifier=2))
        for i, p in enumerate(payloads)
    )
    peer.setblocking(True)
    for start in range(0, len(stream), cut):
        peer.sendall(stream[start : start + cut])
        assert _drain(client) == MQTTErrorCode.MQTT_ERR_AGAIN  # nothing more to read yet
    assert [m.payload for m in got] == payloads
    assert [m.topic for m in got] == ["t/0", "t/1", "t/2"]
    assert [m.mid for m in got] == [1, 2, 3]
    assert [m.properties.SubscriptionIdentifier for m in got] == [[2], [2], [2]]  # type: ignore[union-attr]


def test_a_closed_connection_mid_packet_is_lost_and_forgotten(
    wired: tuple[LeanClient, socket.socket, list[paho.MQTTMessage]],
) -> None:
    client, peer, got = wired
    packet = publish_packet(b"t", os.urandom(1000), props=_props())
    peer.sendall(packet[:500])
    assert _drain(client) == MQTTErrorCode.MQTT_ERR_AGAIN
    peer.close()
    assert _drain(client) == MQTTErrorCode.MQTT_ERR_CONN_LOST
    assert got == []
    assert client._reading.filled == 500 - 3  # less the command byte and two length bytes
    with pytest.raises(ValueError, match="host"):
        client.reconnect()  # never connected here; it still drops the half packet first
    assert client._reading.filled == 0


def test_a_five_byte_remaining_length_is_a_protocol_error(
    wired: tuple[LeanClient, socket.socket, list[paho.MQTTMessage]],
) -> None:
    client, peer, _got = wired
    peer.sendall(b"\x32\xff\xff\xff\xff\x01")
    assert _drain(client) == MQTTErrorCode.MQTT_ERR_PROTOCOL
