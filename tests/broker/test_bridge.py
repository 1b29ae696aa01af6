"""A region's bridge: check-ins and events go up, control and device traffic down, no updates."""

from __future__ import annotations

from broker import MemoryTransport
from broker.bridge import Bridge
from broker.topics import Topics
from broker.transport import Delivery

TOPICS = Topics("tree")


def _listen(bus: MemoryTransport, pattern: str) -> list[tuple[str, bytes]]:
    heard: list[tuple[str, bytes]] = []

    def record(delivery: Delivery) -> None:
        heard.append((delivery.topic, delivery.body))
        delivery.ack()

    bus.subscribe(pattern, record)
    return heard


def test_each_kind_of_traffic_crosses_in_its_own_direction_only() -> None:
    root, region = MemoryTransport(), MemoryTransport()
    bridge = Bridge(root, region, name="east", topics=TOPICS)
    bridge.start()
    at_root = _listen(root, "tree/#")
    in_region = _listen(region, "tree/#")

    region.publish(TOPICS.checkin("d1"), b"check-in")
    region.publish(TOPICS.events("exp"), b"partial ready")
    region.publish(TOPICS.updates("exp", "d1"), b"update")  # stays in the region
    root.publish(TOPICS.control("exp"), b"round opened")
    root.publish(TOPICS.device("d1"), b"task")
    root.publish(TOPICS.combine("exp"), b"combine")  # the root's workers combine
    for _ in range(3):
        region.join(5)
        root.join(5)

    crossed_up = [m for m in at_root if m[1] in (b"check-in", b"partial ready", b"update")]
    crossed_down = [m for m in in_region if m[1] in (b"round opened", b"task", b"combine")]
    assert crossed_up == [
        (TOPICS.checkin("d1"), b"check-in"),
        (TOPICS.events("exp"), b"partial ready"),
    ]
    assert crossed_down == [
        (TOPICS.control("exp"), b"round opened"),
        (TOPICS.device("d1"), b"task"),
    ]
    assert bridge.forwarded == {True: 2, False: 2}
    assert root.unsettled == region.unsettled == 0  # every forwarded frame acked
    bridge.stop()
    region.publish(TOPICS.checkin("d2"), b"after stop")
    region.join(5)
    assert all(body != b"after stop" for _, body in at_root)
    root.close()
    region.close()
