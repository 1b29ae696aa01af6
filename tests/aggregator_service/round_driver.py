"""The coordinator's part in closing rounds, for tests that drive workers without a service.

``RoundDriver`` runs the real ``RoundClosing`` over a transport, signed as the
test service: it announces a round, counts the workers' progress, closes the
round when it is complete (or when the test says the deadline passed) and
asks one worker to combine it. Outcomes end up in ``outcomes``.
"""

from __future__ import annotations

import threading

from aggregator_service.checkpoints import Checkpoints
from aggregator_service.rounds.closing import RoundClosing
from broker import (
    Delivery,
    Message,
    PartialReady,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    RoundProgress,
    Transport,
    decode,
)
from broker.topics import Topics
from model_store import ModelStore
from tests.identities import TOPICS, sign


class RoundDriver:
    """Announces, closes and combines rounds the way the coordinator does."""

    def __init__(
        self, transport: Transport, topics: Topics = TOPICS, store: ModelStore | None = None
    ) -> None:
        self.now = 0.0
        self.outcomes: list[RoundCommitted | RoundAbandoned] = []
        self._transport = transport
        self._lock = threading.Lock()
        roster = Checkpoints(store).roster if store is not None else (lambda _e, _r: [])
        self.closing = RoundClosing(self._publish, topics, clock=lambda: self.now, roster=roster)
        transport.subscribe(topics.all_events, self._on_event)

    def open(self, opened: RoundOpened) -> None:
        """Announce ``opened`` (its deadline is in the driver's clock, ``now``)."""
        with self._lock:
            self.closing.track(opened, asynchronous=False)

    def deadline(self, seconds_later: float = 1e9) -> None:
        """Move the clock on (past every deadline by default) and let the closing act on it."""
        with self._lock:
            self.now += seconds_later
            self.closing.tick()

    def _publish(self, topic: str, message: Message) -> None:
        self._transport.publish(topic, sign(message))

    def _on_event(self, delivery: Delivery) -> None:
        message = decode(delivery.body)
        with self._lock:
            if isinstance(message, RoundProgress):
                self.closing.progress(message)
            elif isinstance(message, PartialReady):
                self.closing.ready(message)
            elif isinstance(message, RoundCommitted | RoundAbandoned):
                self.outcomes.append(message)
                self.closing.ended(message.experiment_id, message.round)
        delivery.ack()
