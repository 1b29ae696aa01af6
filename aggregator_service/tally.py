"""What a worker counts while it folds a round, and how a checkpoint makes it durable.

The synchronous worker and the asynchronous (FedBuff) intake keep the same
ledger: accepted update ids, the devices behind them, rejections by reason,
example and loss totals, and the deliveries still to ack. A checkpoint saves
the ledger with the running sums, then acks those deliveries.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from aggregator_service.checkpoints import Checkpoints, RoundCheckpoint
from aggregator_service.strategies import Partial
from broker import Delivery, ModelUpdate, RoundOpened


def loss_sum(update: ModelUpdate) -> float:
    """Return the update's training loss weighted by its examples (0 without a numeric one).

    May be infinite (a device's loss near the largest float): the caller refuses
    such an update, since a checkpoint cannot save an infinite sum.
    """
    loss = update.metrics.get("loss", 0.0)
    if isinstance(loss, bool) or not isinstance(loss, int | float):
        return 0.0
    try:
        return float(loss) * update.num_examples
    except OverflowError:  # an integer beyond any float
        return math.inf


@dataclass(kw_only=True)
class Tally:
    """The ledger of one round (or server step) being aggregated."""

    accepted: list[str] = field(default_factory=list)
    counted: set[str] = field(default_factory=set)
    """Message ids already folded or set aside (the ledger's fast lookup)."""
    accepted_devices: set[str] = field(default_factory=set)
    rejected: Counter[str] = field(default_factory=Counter)
    examples: int = 0
    loss_sum: float = 0.0
    aside: list[str] = field(default_factory=list)
    """Ids of redelivered updates set aside (``AsideUpdate``), counted only when combined."""
    aside_devices: set[str] = field(default_factory=set)
    pending: list[Delivery] = field(default_factory=list)
    """Deliveries folded but not yet acked: the next checkpoint acks them."""
    checkpoints: int = 0

    def count_accepted(self, update: ModelUpdate) -> None:
        """Record a folded update."""
        self.accepted.append(update.message_id)
        self.counted.add(update.message_id)
        self.accepted_devices.add(update.device_id)
        self.examples += update.num_examples
        self.loss_sum += loss_sum(update)

    def count_aside(self, update: ModelUpdate) -> None:
        """Record an update set aside: its device has answered here, its sums are apart."""
        self.aside.append(update.message_id)
        self.counted.add(update.message_id)
        self.aside_devices.add(update.device_id)

    @property
    def answered_devices(self) -> set[str]:
        """Return the devices whose update is folded or set aside here."""
        return self.accepted_devices | self.aside_devices

    def checkpoint(
        self,
        checkpoints: Checkpoints,
        opened: RoundOpened,
        partial: Partial,
        reporters: list[str],
        worker: str | None = None,
    ) -> RoundCheckpoint:
        """Save the ledger with the running ``partial``, then ack what it holds; return it.

        Raises ``Sealed`` (acking nothing) if the round was sealed first.
        """
        saved = RoundCheckpoint(
            sequence=self.checkpoints,
            partial=partial,
            accepted=list(self.accepted),
            accepted_devices=sorted(self.accepted_devices),
            rejected=dict(self.rejected),
            reporters=reporters,
            examples=self.examples,
            loss_sum=self.loss_sum,
            aside=list(self.aside),
            aside_devices=sorted(self.aside_devices),
        )
        checkpoints.save(opened.experiment_id, opened.round, saved, worker)
        self.checkpoints += 1
        for delivery in self.pending:
            delivery.ack()
        self.pending.clear()
        return saved
