"""The test proxy tells acknowledgements apart from everything else a client sends."""

from __future__ import annotations

import struct

from tests.tcp_proxy import _amqp_frames, _mqtt_frames


def _amqp_method(class_id: int, method_id: int, args: bytes = b"") -> bytes:
    payload = struct.pack(">HH", class_id, method_id) + args
    return struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"


def test_amqp_frames_arriving_in_pieces_come_out_whole_with_basic_ack_marked() -> None:
    ack = _amqp_method(60, 80, struct.pack(">QB", 7, 0))
    publish = _amqp_method(60, 40, b"\x00\x00")
    body = struct.pack(">BHI", 3, 1, 3) + b"abc" + b"\xce"
    stream = b"AMQP\x00\x00\x09\x01" + publish + body + ack
    pending, frames = bytearray(), []
    for i in range(0, len(stream), 5):  # five bytes at a time
        pending += stream[i : i + 5]
        frames += _amqp_frames(pending)

    assert [f for f, _ in frames] == [b"AMQP\x00\x00\x09\x01", publish, body, ack]
    assert [is_ack for _, is_ack in frames] == [False, False, False, True]
    assert pending == b""


def test_mqtt_packets_with_long_lengths_come_out_whole_with_puback_marked() -> None:
    publish = bytes([0x32, 0x80, 0x01]) + b"x" * 128  # a two-byte remaining length
    puback = bytes([0x40, 0x02, 0x00, 0x05])
    ping = bytes([0xC0, 0x00])
    stream = publish + puback + ping
    pending, packets = bytearray(), []
    for i in range(0, len(stream), 3):
        pending += stream[i : i + 3]
        packets += _mqtt_frames(pending)

    assert packets == [(publish, False), (puback, True), (ping, False)]
    assert pending == b""
