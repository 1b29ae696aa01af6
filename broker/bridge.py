"""A region's bridge: carries device and round traffic between a region's broker and the root's.

The aggregation tree's edges. A region's devices and its edge workers share
the region's broker; the coordinator and the root workers, which combine,
share the root's. The bridge forwards what the other side must hear, frames
byte for byte (every frame is signed by its sender and names its topic, so
the receivers' checks are the same as without a bridge):

- **up** (region -> root): device check-ins, heartbeats and check-outs, and
  the edge workers' events (``RoundProgress``, ``PartialReady``): a region
  sends one partial per round upstream, by reference (its checkpoint is in
  the shared model store);
- **down** (root -> region): round control (``RoundOpened``, ``CloseRound``)
  and the coordinator's messages to devices (tasks, check-in replies).

Updates never leave their region, and combine requests never reach it: the
root's workers combine, so no process sees every device's update. A chain
of bridges (region -> middle -> root) makes a deeper tree of brokers; the
partials are still merged once, by the root's combiner.

Each direction consumes a durable group queue of its own and acks a frame
only after the other broker confirmed it, so a bridge that restarts loses
nothing; a frame forwarded twice is dropped by its receiver (message ids).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from broker.topics import Topics
from broker.transport import Delivery, Subscription, Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """Frames on ``pattern`` go from one side to the other."""

    pattern: str
    upward: bool


def routes(topics: Topics) -> tuple[Route, ...]:
    """Return what a region's bridge carries, each pattern and its direction."""
    return (
        Route(topics.all_checkins, upward=True),
        Route(topics.all_events, upward=True),
        Route(topics.all_control, upward=False),
        Route(topics.all_devices, upward=False),
    )


class Bridge:
    """Forwards a region's traffic to and from the root.

    Parameters
    ----------
    root
        The root's broker (the coordinator's).
    region
        The region's broker (its devices' and edge workers').
    name
        The region's name: its bridge's group queues are named after it, so a
        restarted bridge resumes them.
    topics
        The deployment's topics (the same namespace on both sides).
    """

    def __init__(
        self, root: Transport, region: Transport, *, name: str, topics: Topics | None = None
    ) -> None:
        self._root = root
        self._region = region
        self._name = name
        self._topics = topics or Topics()
        self._subscriptions: list[Subscription] = []
        self.forwarded = {True: 0, False: 0}
        """Frames carried up (True) and down (False) so far."""

    def start(self) -> None:
        """Subscribe to both sides."""
        for index, route in enumerate(routes(self._topics)):
            source = self._region if route.upward else self._root
            group = f"{self._topics.namespace}-bridge-{self._name}-{index}"
            handler = self._forwarder(route)
            self._subscriptions.append(source.subscribe(route.pattern, handler, group=group))

    def stop(self) -> None:
        """Stop forwarding (the group queues keep what arrives meanwhile)."""
        for subscription in self._subscriptions:
            subscription.cancel()
        self._subscriptions.clear()

    def _forwarder(self, route: Route) -> _Forward:
        target = self._root if route.upward else self._region
        return _Forward(self, target, route.upward)


@dataclass(frozen=True)
class _Forward:
    """One direction's handler: publish on the other side, then ack."""

    bridge: Bridge
    target: Transport
    upward: bool

    def __call__(self, delivery: Delivery) -> None:
        # Acked only once the other broker has it: publish returns after its confirm.
        self.target.publish(delivery.topic, delivery.body)
        delivery.ack()
        self.bridge.forwarded[self.upward] += 1
