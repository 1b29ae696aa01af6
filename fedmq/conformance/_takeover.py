"""Dropping a device's broker connection without touching the broker: a client-id takeover.

An MQTT broker keeps one connection per client id: when a second client
connects with the device's id, the broker closes the device's connection
(MQTT 5 reason "session taken over"). The kit connects with the device's id,
resuming its persistent session so nothing queued for it is lost, and leaves
at once with a clean DISCONNECT; the device must then reconnect, subscribe and
check in, as it would after any dropped connection. No broker setting changes,
so it works on a shared Mosquitto.
"""

from __future__ import annotations

from broker import connect
from broker.connect import binds_client_ids
from fedmq.conformance._kit import TakeOver


def connection_taker(broker_url: str, device_id: str) -> TakeOver | None:
    """Return what takes ``device_id``'s connection on ``broker_url`` (None: not an MQTT broker)."""
    # A protocol property, not a transport choice: only MQTT binds a connection to a client id.
    if not binds_client_ids(broker_url):
        return None

    def take_over() -> None:
        connect(broker_url, client_id=device_id).close()

    return take_over
