"""The MQTT transport (``mqtt://``): paho-mqtt, MQTT 5, QoS 1 for everything.

Threads: paho's network thread (``loop_start``, owned here) runs every
``_on_*`` callback and reconnects; one dispatcher thread runs the handlers in
arrival order, so a handler that trains for minutes never stalls the network
loop. The network thread reads at most ``READ_AHEAD_BYTES`` (16 MiB) ahead of
the handlers (not while a PUBACK someone waits for may lie behind what it
would hold back: see ``_on_message``); paho's receive path is
replaced by ``broker._mqtt_receive`` (one copy of a message, not about ten).
Acks travel back through paho's thread-safe packet queue. The session
itself (``MqttSession``) does not care who drives the network:
``broker.mqtt_hub`` runs many of them on one selector thread.

How the ``Transport`` promises map onto MQTT:

- ``publish`` waits for the PUBACK. paho keeps a QoS 1 message across a lost
  connection and sends it again after reconnecting, so a publish made while the
  connection is down completes once it is back (bounded by ``publish_timeout``).
  A message above the broker's announced Maximum Packet Size is refused here.
- Reconnecting is paho's loop with ``broker.retry.backoff`` delays, for as long
  as the transport is open; subscriptions are renewed in ``on_connect``. An ack
  for a message received on an earlier connection is dropped (its packet id
  may be reused); the broker redelivers that message instead. ``on_reconnect``
  listeners run after each reconnect.
- A restarted broker may come back without some subscriptions (Mosquitto 2.0
  restores a persistent session's plain subscriptions, not its shared ones)
  until their clients reconnect, and drops what nobody subscribes to. So for
  ``RESUBSCRIBE_GRACE`` seconds after a reconnect, a publish to a topic that had
  subscribers before, answered with "no matching subscribers", is sent again
  after a short back-off.
- Acks are manual, and the CONNECT asks for Receive Maximum 65535: a consumer
  may hold many unacked messages (the aggregator acks a round's updates at
  commit) without the broker pausing delivery at its default of 20 in flight.
- A ``group`` is an MQTT 5 shared subscription (``$share/<group>/<topic>``).
  Every subscription carries an identifier derived from its filter, which tells
  a group's copy of a message from a plain subscriber's copy of the same one.
- A ``client_id`` in the URL makes the session persistent (clean start off, a
  session expiry): a process that reconnects with that id gets what was queued
  and what it left unacked, with the DUP flag set. Messages that arrive before
  their handler is subscribed again wait until it is.
- MQTT has no negative ack: ``nack(requeue=True)`` republishes the message with
  the user property ``fedmq-redelivered`` and acks the original;
  ``nack(requeue=False)`` republishes it to ``fedmq/dead-letters/<topic>``.
- ``mqtts://`` verifies the broker's certificate against the URL's ``ca`` (or
  the system's store) and its host name. A certificate that does not verify
  fails the first connect at once with ``TlsError``; later, paho keeps trying.
- ``?protocol=3.1.1`` (for amqtt) has no shared subscriptions, subscription
  identifiers or user properties: group members compete only within one
  transport, overlapping filters may deliver a message twice, and a requeued
  message is not marked redelivered.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from broker._mqtt_options import MqttOptions
from broker._mqtt_receive import LeanClient
from broker._mqtt_routing import (
    READ_AHEAD_BYTES,
    Dispatcher,
    Inbound,
    MqttDelivery,
    MqttSubscription,
    Route,
    RouteTable,
)
from broker._mqtt_wire import (
    TRANSIENT_REFUSALS,
    connect_options,
    first_connect_error,
    no_delay,
    publish_size,
    read_inbound,
    redelivered_marker,
    subscribe_properties,
    watch_tls,
)
from broker.connect import describe_tls_failure, is_permanent_tls_failure
from broker.errors import ConnectionLost, TransportError
from broker.retry import backoff
from broker.transport import Handler, ReconnectListener, Will, notify_reconnected

__all__ = ["MqttDelivery", "MqttSession", "MqttSubscription", "MqttTransport"]

log = logging.getLogger(__name__)


def _not_a_shutdown_race(record: logging.LogRecord) -> bool:
    """Drop paho's error for its network loop noticing a socket ``close()`` just shut."""
    return not record.getMessage().startswith("Client is not connected")


_PAHO_LOG = logging.getLogger(f"{__name__}.paho")
_PAHO_LOG.addFilter(_not_a_shutdown_race)

SUBACK_TIMEOUT = 10.0
STABLE_AFTER = 10.0
"""Seconds a connection must last before reconnect back-off starts again from zero."""
RESUBSCRIBE_GRACE = 30.0
"""Seconds after a reconnect that a publish matching no subscription is retried.

The longest reconnect back-off: subscribers cut off by the same broker restart
are back by then.
"""
_NO_MATCHING_SUBSCRIBERS = 0x10
_MATCHED_TOPICS = 4096
"""Topics remembered as having had subscribers (the most recently published)."""


PUBLISH_WINDOW = 500
"""Messages ``publish_many`` has in paho's hands at once (its own in-flight window is 20)."""

READ_AHEAD_WAIT_S = 0.1
"""Longest the network thread waits for the handlers to catch up before reading one more.

Bounded: while it waits, paho writes nothing (acks queue up) and sends no
keep-alive, and a handler stuck elsewhere must not stop the connection.
"""
STALLED_HANDLER_S = 1.0
"""A handler call running longer than this no longer holds the reader back."""
PARKED_PACING_S = 10.0
"""Seconds after a connect in which parked messages count toward the read-ahead.

Long enough for a process to subscribe to what its resumed session holds;
afterwards, messages nobody claims must not slow the reader.
"""


class MqttSession(abc.ABC):
    """One MQTT client's session: publish, subscribe, settle, and paho's callbacks.

    What it leaves out is driving the network: ``MqttTransport`` gives each
    client paho's own thread (``loop_start``) and a dispatcher thread;
    ``broker.mqtt_hub`` drives many clients from one selector thread. A driver
    provides ``close`` and the hooks ``_submit``, ``_reconnected`` and
    ``_retry``, and has paho call the ``_on_*`` callbacks on its network thread.
    """

    def __init__(self, options: MqttOptions, will: Will | None) -> None:
        self._options = options
        self._v5 = self._options.protocol == "5"
        self._lock = threading.Condition()
        self._table = RouteTable(shared_groups=self._v5)
        self._connected = False
        self._closed = False
        self._epoch = 0
        self._attempt = 0
        self._refused: ReasonCode | None = None
        self._handshake_error: OSError | None = None  # of the connection attempt under way
        self._tls_failure: OSError | None = None  # why the last first-connect attempt failed
        self._network_thread: int | None = None
        self._socket_opened = False
        self._connected_at = 0.0
        self._session_present = False
        self._reconnected_at: float | None = None
        self._reconnect_listeners: list[ReconnectListener] = []
        self._max_packet: int | None = None
        self._subacks: dict[int, list[ReasonCode] | None] = {}
        self._puback_failures: dict[int, ReasonCode] = {}
        self._unmatched: set[int] = set()
        self._matched: OrderedDict[str, None] = OrderedDict()
        self._handler_awaits_ack = False  # a handler waits for a PUBACK (guarded by _lock)
        self._ack_waits: list[float] = []  # when each publish now waiting began (guarded)
        self._parked_this_connection = 0  # bytes parked since the last connect
        self._long_ack_wait = options.publish_timeout / 4
        self._client = self._make_client(will)

    @property
    def url(self) -> str:
        """Return the broker's address, without the password."""
        return self._options.safe_url

    @property
    def client_id(self) -> str:
        """Return the MQTT client id (generated when the URL gave none)."""
        return self._options.client_id

    def publish(self, topic: str, body: bytes) -> None:
        """Publish ``body`` at QoS 1; return once the broker acknowledged it."""
        self._publish(topic, body, redelivered=False)

    def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Publish every ``(topic, body)`` at QoS 1, all in flight at once, until each is acked.

        paho keeps its in-flight window full and queues the rest, so the
        broker's acknowledgements overlap: a round's 10,000 tasks sent one
        PUBACK at a time took 23-105 s here. They go in windows of
        ``PUBLISH_WINDOW``: after a reconnect paho resends everything queued
        at once, and packet ids (16 bits) must not wrap inside a window. A
        message that matched no subscriber just after a reconnect is
        published again, alone, as ``publish`` does.
        """
        if threading.get_ident() == self._network_thread:
            raise TransportError("publish from a paho callback would wait on itself")
        self._check_open()
        for topic, body in messages:
            self._check_size(topic, body, None)
        for start in range(0, len(messages), PUBLISH_WINDOW):
            window = messages[start : start + PUBLISH_WINDOW]
            sent = [(topic, body, self._send(topic, body, None)) for topic, body in window]
            try:
                for topic, body, info in sent:
                    if not self._confirmed(info, topic) and self._resubscribing(topic):
                        self._publish(topic, body, redelivered=False)
            finally:
                # After a failure, the rest of the window's outcomes are nobody's: drop
                # them, so a later message that reuses a packet id is not misjudged.
                for _, _, info in sent:
                    self._unmatched.discard(info.mid)
                    self._puback_failures.pop(info.mid, None)

    def subscribe(
        self, topic: str, handler: Handler, *, group: str | None = None
    ) -> MqttSubscription:
        """Call ``handler`` off the network thread for each message matching ``topic``.

        On a fresh session this returns once the broker has confirmed the
        subscription. On a resumed one it returns at once (the broker answers
        only after sending the session's backlog): the session's own
        subscriptions are already in place, while one new to it may miss what
        another client publishes in the instant before the broker takes it.
        """
        with self._lock:
            self._check_open()
            route, fresh = self._table.add(topic, group, handler)
            for inbound, handlers in self._table.unpark():
                self._dispatch(inbound, handlers)
            mid = self._send_subscribe(route) if fresh and self._connected else None
            # A resumed session's broker sends its whole backlog before this
            # SUBACK: waiting for it would leave the backlog parked (0.2 s for
            # 500 updates of 400 KB) although the session already holds the
            # subscription. A refusal is then logged when the SUBACK comes.
            wait = mid is not None and not self._session_present
            if wait and mid is not None:
                self._subacks[mid] = None
        if wait and mid is not None:
            self._await_suback(mid, route, handler)
        return MqttSubscription(route, handler, self._cancel)

    def on_reconnect(self, listener: ReconnectListener) -> None:
        """Call ``listener`` on a thread of its own after every reconnect (not the first connect).

        Parameters
        ----------
        listener
            Called with no arguments; it may publish. A device checks in again
            with it: a broker shutting down publishes every client's last will.
        """
        with self._lock:
            self._reconnect_listeners.append(listener)

    # -- what each way of driving the network provides -------------------------

    @abc.abstractmethod
    def close(self) -> None:
        """Disconnect cleanly (no will); unacked messages stay with the broker. Idempotent."""

    @abc.abstractmethod
    def _submit(self, handler: Handler, delivery: MqttDelivery) -> None:
        """Run ``handler(delivery)`` off the network thread, after the deliveries before it."""

    @abc.abstractmethod
    def _reconnected(self, listeners: list[ReconnectListener]) -> None:
        """Run the reconnect ``listeners`` off the network thread (they may publish)."""

    @abc.abstractmethod
    def _retry(self, attempt: int) -> None:
        """Connect again after the back-off of retry number ``attempt``."""

    # -- settling, called by MqttDelivery off the network thread ---------------

    def _settle(self, inbound: Inbound) -> None:
        """Count one local delivery of ``inbound`` as settled; PUBACK it after the last."""
        with self._lock:
            inbound.pending -= 1
            if inbound.pending > 0 or inbound.qos == 0:
                return
            if not self._connected or inbound.epoch != self._epoch:
                # The packet id may already name another message on the new
                # connection; the broker redelivers this one instead.
                log.debug("dropped an ack from an old connection (%s)", inbound.topic)
                return
            self._client.ack(inbound.mid, inbound.qos)

    def _republish(self, topic: str, body: bytes, *, redelivered: bool) -> None:
        """Publish ``body`` again, with the redelivered marker when asked."""
        self._publish(topic, body, redelivered=redelivered)

    # -- internals -------------------------------------------------------------

    def _make_client(self, will: Will | None) -> paho.Client:
        opts = self._options
        client = LeanClient(
            CallbackAPIVersion.VERSION2,
            client_id=opts.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else not opts.persistent,
            manual_ack=True,
        )
        client.enable_logger(_PAHO_LOG)
        if opts.username is not None:
            client.username_pw_set(opts.username, opts.password)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=False)
        if opts.tls is not None:
            client.tls_set_context(opts.tls)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        return client

    def _publish(self, topic: str, body: bytes, *, redelivered: bool) -> None:
        if threading.get_ident() == self._network_thread:
            raise TransportError("publish from a paho callback would wait on itself")
        self._check_open()
        props = redelivered_marker() if redelivered and self._v5 else None
        self._check_size(topic, body, props)
        attempt = 0
        while not self._publish_once(topic, body, props) and self._resubscribing(topic):
            log.info("nobody subscribes to %s yet after a reconnect; publishing again", topic)
            time.sleep(backoff(attempt, base=0.25, cap=2.0))
            attempt += 1

    def _publish_once(self, topic: str, body: bytes, props: Properties | None) -> bool:
        """Publish and wait for the PUBACK; return whether a subscription matched."""
        return self._confirmed(self._send(topic, body, props), topic)

    def _send(self, topic: str, body: bytes, props: Properties | None) -> paho.MQTTMessageInfo:
        """Hand one QoS 1 message to paho (sent now, or once reconnected); return its handle."""
        try:
            info = self._client.publish(topic, body, qos=1, properties=props)
        except (ValueError, TypeError) as exc:
            raise TransportError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(f"paho's outgoing queue is full; {topic} not published")
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            # paho queued the message and sends it once reconnected; clear the
            # code so the wait below waits for that instead of failing at once.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        return info

    def _confirmed(self, info: paho.MQTTMessageInfo, topic: str) -> bool:
        """Wait for a sent message's PUBACK; return whether a subscription matched."""
        try:
            self._await_puback(info, topic)
        finally:
            unmatched = info.mid in self._unmatched
            self._unmatched.discard(info.mid)
        if not unmatched:
            with self._lock:
                self._matched[topic] = None
                self._matched.move_to_end(topic)
                if len(self._matched) > _MATCHED_TOPICS:
                    self._matched.popitem(last=False)
        return not unmatched

    def _resubscribing(self, topic: str) -> bool:
        """Return whether ``topic``'s subscribers may still be coming back after a reconnect."""
        at = self._reconnected_at
        recent = at is not None and time.monotonic() - at < RESUBSCRIBE_GRACE
        with self._lock:
            return recent and not self._closed and topic in self._matched

    def _check_size(self, topic: str, body: bytes, props: Properties | None) -> None:
        """Refuse what the broker's Maximum Packet Size forbids, before paho queues it."""
        # Sent anyway, the broker drops the connection and paho resends the
        # message after every reconnect: a loop no publish_timeout ends.
        limit = self._max_packet
        if limit is None:
            return
        size = publish_size(topic, body, props)
        if size > limit:
            raise TransportError(
                f"{self.url} takes packets up to {limit} bytes; a {size}-byte message to"
                f" {topic} is refused (send large payloads by reference)"
            )

    def _await_puback(self, info: paho.MQTTMessageInfo, topic: str) -> None:
        handler = self._on_handler_thread()
        began = time.monotonic()
        with self._lock:
            self._handler_awaits_ack |= handler
            self._ack_waits.append(began)
        try:
            self._wait_for_puback(info, topic)
        finally:
            with self._lock:
                if handler:
                    self._handler_awaits_ack = False
                self._ack_waits.remove(began)

    def _wait_for_puback(self, info: paho.MQTTMessageInfo, topic: str) -> None:
        timeout = self._options.publish_timeout
        deadline = time.monotonic() + timeout
        try:
            while not info.is_published():
                remaining = deadline - time.monotonic()
                if self._closed:
                    raise TransportError(f"transport closed before {self.url} confirmed {topic}")
                if remaining <= 0:
                    if self._connected:
                        raise TransportError(f"{self.url} did not confirm {topic} in {timeout:g} s")
                    raise ConnectionLost(f"no connection to {self.url} for {timeout:g} s ({topic})")
                info.wait_for_publish(min(remaining, 0.25))
        except (RuntimeError, ValueError) as exc:
            raise ConnectionLost(f"publishing to {topic} on {self.url} failed: {exc}") from exc
        failure = self._puback_failures.pop(info.mid, None)
        if failure is not None:
            raise TransportError(f"{self.url} refused a message to {topic}: {failure}")

    def _send_subscribe(self, route: Route) -> int | None:
        """Send one SUBSCRIBE for ``route`` (lock held); return its packet id."""
        if self._v5:
            options = SubscribeOptions(qos=1)
            props = subscribe_properties(route.sub_id)
            rc, mid = self._client.subscribe(route.broker_filter, options=options, properties=props)
        else:
            rc, mid = self._client.subscribe(route.broker_filter, qos=1)
        return mid if rc == MQTTErrorCode.MQTT_ERR_SUCCESS else None

    def _await_suback(self, mid: int, route: Route, handler: Handler) -> None:
        with self._lock:
            self._lock.wait_for(
                lambda: self._subacks.get(mid) is not None or not self._connected or self._closed,
                SUBACK_TIMEOUT,
            )
            reasons = self._subacks.pop(mid, None) or []
            failed = [r for r in reasons if r.is_failure]
            if failed:
                self._table.remove(route, handler)
        # No answer means the connection dropped; on_connect subscribes again.
        if failed:
            raise TransportError(f"{self.url} refused {route.broker_filter!r}: {failed[0]}")

    def _cancel(self, route: Route, handler: Handler) -> None:
        with self._lock:
            if self._table.remove(route, handler) and self._connected and not self._closed:
                self._client.unsubscribe(route.broker_filter)

    def _dispatch(self, inbound: Inbound, handlers: list[Handler]) -> None:
        inbound.pending += len(handlers)
        for handler in handlers:
            delivery = MqttDelivery(inbound.topic, inbound.body, inbound.redelivered, inbound, self)
            self._submit(handler, delivery)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"the transport to {self.url} is closed")

    # -- paho callbacks (network thread) -----------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._network_thread = threading.get_ident()
        if reason.is_failure:
            log.warning("%s refused the connection: %s", self.url, reason)
            if reason.value not in TRANSIENT_REFUSALS:
                with self._lock:
                    self._refused = reason
                    self._lock.notify_all()
            return
        with self._lock:
            again = self._connected_at > 0.0  # connected before: this is a reconnect
            self._connected = True
            self._connected_at = time.monotonic()
            self._parked_this_connection = 0
            self._session_present = bool(flags.session_present)
            if again:
                self._reconnected_at = self._connected_at
            self._max_packet = getattr(properties, "MaximumPacketSize", None)
            self._epoch += 1
            # Subscribing here renews every subscription after a reconnect,
            # also when the broker lost the session (restarted, expired).
            sent: set[str] = set()
            for route in self._table.routes():
                if route.broker_filter not in sent:
                    sent.add(route.broker_filter)
                    self._send_subscribe(route)
            self._lock.notify_all()
            listeners = list(self._reconnect_listeners) if again else []
        log.info("connected to %s (session present: %s)", self.url, flags.session_present)
        if listeners:
            self._reconnected(listeners)

    def _on_socket_open(self, client: paho.Client, userdata: object, sock: Any) -> None:
        self._socket_opened = True
        no_delay(sock)

    def _on_connect_fail(self, client: paho.Client, userdata: object) -> None:
        with self._lock:
            attempt, self._attempt = self._attempt, self._attempt + 1
            tls = self._take_tls_failure()
        why = f": {describe_tls_failure(tls)}" if tls is not None else ""
        log.info("cannot reach %s (attempt %d%s); retrying", self.url, attempt + 1, why)
        self._retry(attempt)

    def _on_tls_failure(self, error: OSError) -> None:
        # Called on paho's network thread inside its connect or read, which then
        # calls _on_connect_fail or _on_disconnect; paho holds none of its locks
        # here, nor is ours needed.
        self._handshake_error = error

    def _take_tls_failure(self) -> OSError | None:
        """Take the failed attempt's TLS error; keep it while still connecting (lock held)."""
        failure, self._handshake_error = self._handshake_error, None
        if not self._connected_at:  # the first connect: _connect reports it
            self._tls_failure = failure
            self._lock.notify_all()
        return failure

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._lock:
            self._connected = False
            self._epoch += 1
            # Back-off restarts only after a connection that lasted: a broker that
            # accepts and then drops us at once must not be hammered.
            if time.monotonic() - self._connected_at >= STABLE_AFTER:
                self._attempt = 0
            attempt, self._attempt = self._attempt, self._attempt + 1
            self._take_tls_failure()
            self._lock.notify_all()
            if self._closed:
                return
        log.warning("lost the connection to %s (%s); reconnecting", self.url, reason)
        self._retry(attempt)

    def _on_message(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with self._lock:
            inbound = read_inbound(message, self._epoch)
            handlers = self._table.targets(inbound)
            if handlers:
                self._dispatch(inbound, handlers)
            else:
                self._table.park(inbound)
                self._parked_this_connection += len(inbound.body)
            waits = self._ack_waits
            long_wait = bool(waits) and time.monotonic() - min(waits) > self._long_ack_wait
            blocked = self._handler_awaits_ack or long_wait
        if not blocked:
            # A PUBACK lies behind what the broker queued ahead of it. A handler
            # waiting for one cannot make room, so never pause then; another
            # thread's arrives as the handlers catch up, and once one has waited
            # a quarter of the publish timeout the reader reads on to it.
            self._pace_reading()

    def _on_handler_thread(self) -> bool:
        """Return whether this is a thread that runs handlers (a driver's answer)."""
        return False

    def _pace_reading(self) -> None:  # noqa: B027  # drivers without pacing keep it empty
        """Hold the network thread while the handlers are behind (a driver's choice)."""

    def _on_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason: ReasonCode,
        properties: Properties,
    ) -> None:
        # 0x10 "no matching subscribers" is a success; only failures are kept.
        # paho calls this holding its message lock, so ours is not taken here.
        if reason.is_failure:
            self._puback_failures[mid] = reason
        elif reason.value == _NO_MATCHING_SUBSCRIBERS:
            self._unmatched.add(mid)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties,
    ) -> None:
        with self._lock:
            if mid in self._subacks:
                self._subacks[mid] = list(reasons)
                self._lock.notify_all()
                return
        for reason in reasons:
            if reason.is_failure:
                log.error("%s refused a subscription (renewed or resumed): %s", self.url, reason)


class MqttTransport(MqttSession):
    """The MQTT transport; build it with ``from_url`` or ``broker.connect``.

    Parameters
    ----------
    url
        ``mqtt://[user:password@]host[:port][?option=value...]``, or ``mqtts://``
        (port 8883 by default); options are ``client_id`` (makes the session
        persistent), ``session_expiry`` (seconds, default 3600), ``keepalive``,
        ``protocol`` (``5`` or ``3.1.1``), ``connect_timeout`` (default 5 s),
        ``publish_timeout`` (default 60 s), and for ``mqtts://`` ``ca``, ``cert``
        and ``key`` (PEM file paths: the CA to verify the broker with, our
        certificate and key).
    will
        ``(topic, payload)`` the broker publishes (QoS 1, not retained) if this
        client vanishes without closing; a clean ``close()`` does not send it.
    client_id
        The MQTT client id, making the session persistent; overrides the URL's.

    Raises
    ------
    ConnectionLost
        No broker accepted the connection within ``connect_timeout``.
    TlsError
        The broker's certificate did not verify, or it refused ours.
    TransportError
        The URL is malformed, or the broker refused the client for good.
    """

    READ_AHEAD_BYTES = READ_AHEAD_BYTES
    """Bytes of messages read ahead of the handlers (``broker._mqtt_routing.READ_AHEAD_BYTES``)."""

    def __init__(
        self,
        url: str = "mqtt://127.0.0.1:1883",
        *,
        will: Will | None = None,
        client_id: str | None = None,
    ) -> None:
        super().__init__(MqttOptions.parse(url, client_id=client_id), will)
        name = f"fedmq-mqtt-{self._options.client_id}"
        self._dispatcher = Dispatcher(name, read_ahead=self.READ_AHEAD_BYTES)
        self._connect()

    @classmethod
    def from_url(
        cls, url: str, *, client_id: str | None = None, will: Will | None = None
    ) -> MqttTransport:
        """Connect to the broker at ``url`` (see the class for the parameters)."""
        return cls(url, will=will, client_id=client_id)

    def close(self) -> None:
        """Disconnect cleanly (no will); unacked messages stay with the broker. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify_all()
        # The running handler may still ack before the DISCONNECT goes out.
        self._dispatcher.stop()
        self._client.disconnect()
        self._client.loop_stop()

    # -- the network thread: paho's loop_start ---------------------------------

    def _make_client(self, will: Will | None) -> paho.Client:
        client = super()._make_client(will)
        if self._options.tls is not None:
            # paho retries a failed handshake and keeps the reason to itself.
            watch_tls(self._options.tls, self._on_tls_failure)
        return client

    def _connect(self) -> None:
        """Start the network thread and wait, bounded, for the first CONNACK."""
        opts = self._options
        kwargs = connect_options(opts) if self._v5 else {}
        self._set_reconnect_delay(0)
        try:
            self._client.connect_async(opts.host, opts.port, opts.keepalive, **kwargs)
        except ValueError as exc:
            self._dispatcher.stop()
            raise TransportError(f"cannot connect to {self.url}: {exc}") from exc
        self._client.loop_start()
        with self._lock:
            self._lock.wait_for(
                lambda: self._connected or self._refused is not None or self._tls_refused(),
                opts.connect_timeout,
            )
            connected, refused, tls = self._connected, self._refused, self._tls_failure
        if connected:
            return
        self._closed = True
        self._client.disconnect()
        self._client.loop_stop()
        self._dispatcher.stop()
        raise first_connect_error(
            opts, refused=refused, tls=tls, answered=self._socket_opened and self._v5
        )

    def _tls_refused(self) -> bool:
        """Return whether the first connect failed a TLS handshake for good (lock held)."""
        failure = self._tls_failure
        return failure is not None and is_permanent_tls_failure(failure)

    def _set_reconnect_delay(self, attempt: int) -> None:
        delay = backoff(attempt)
        # paho annotates the delays as int but computes with floats; min == max
        # makes its next wait this delay rather than its own doubling.
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _submit(self, handler: Handler, delivery: MqttDelivery) -> None:
        self._dispatcher.submit(handler, delivery)

    def _on_handler_thread(self) -> bool:
        return self._dispatcher.is_running_here()

    def _pace_reading(self) -> None:
        if self._dispatcher.stalled(STALLED_HANDLER_S):
            return  # stuck (a store outage, say): reading on cannot make it worse
        if time.monotonic() - self._connected_at < PARKED_PACING_S:
            # Just connected: a resumed session's backlog arrives before the
            # subscriptions that claim it, and parks; it counts as read ahead.
            self._dispatcher.wait_for_room(READ_AHEAD_WAIT_S, self._parked_bytes)
        else:
            self._dispatcher.wait_for_room(READ_AHEAD_WAIT_S)

    def _parked_bytes(self) -> int:
        # What an earlier connection parked and nobody claimed does not hold this one back.
        return min(self._table.parked_bytes, self._parked_this_connection)

    def _reconnected(self, listeners: list[ReconnectListener]) -> None:
        notify_reconnected(listeners, "fedmq-mqtt-reconnected")

    def _retry(self, attempt: int) -> None:
        self._set_reconnect_delay(attempt)
