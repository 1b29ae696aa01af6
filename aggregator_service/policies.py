"""How a worker's share of a round takes updates: a cohort round, or a buffered (FedBuff) step.

The worker has one intake pipeline (frame in, validated update out, folded
into its share); what differs between the two kinds of round is decided here,
once per experiment, from its strategy:

- a **cohort round** takes one update from each selected device, trained on
  the round's base version; an update of an earlier round is late;
- a **buffered step** (FedBuff) takes an update from any device with a task,
  trained on any of the last ``max_staleness`` versions, folded as its delta
  from that version; an update whose step has closed waits for the next one.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import numpy as np

from aggregator_service.share import Share
from aggregator_service.strategies import FedBuff, StaleUpdate, Strategy
from aggregator_service.types import ClientUpdate, Weights
from aggregator_service.validation import Rejected
from aggregator_service.versions import WEIGHTS_ARTIFACT
from broker import ModelUpdate, RejectReason, RoundOpened, decode_weights
from broker.messages import TaskGrant
from model_store import ModelStore, StoreError


class Placement(enum.Enum):
    """Where an update goes on arrival."""

    FOLD = "fold"
    """Into the open round's share."""
    HOLD = "hold"
    """Held unacked for a round not announced here yet."""
    LATE = "late"
    """Refused: its round is over (or was never open)."""


class RoundPolicy(ABC):
    """The rules of one kind of round; the worker's pipeline asks them at each step."""

    @abstractmethod
    def begin(self, opened: RoundOpened, strategy: Strategy, current: Weights) -> Any:
        """Return an empty share's strategy state for the announced round."""

    @abstractmethod
    def place(
        self, update: ModelUpdate, open_round: int | None, last_closed: int | None
    ) -> Placement:
        """Return where ``update`` goes, given the round open here and the last one closed."""

    @abstractmethod
    def check_sender(self, share: Share, update: ModelUpdate) -> None:
        """Raise ``Rejected`` if the sender may not report here (it has not answered, then)."""

    @abstractmethod
    def check_base(self, share: Share, update: ModelUpdate) -> None:
        """Raise ``Rejected`` if the update trained on a version this round cannot take."""

    @abstractmethod
    def client_update(
        self, share: Share, update: ModelUpdate, weights: Weights, control: Weights | None
    ) -> ClientUpdate:
        """Return what the strategy folds for a validated update."""

    @abstractmethod
    def ledger_rounds(self, share: Share, update: ModelUpdate) -> range:
        """Return the rounds whose ledgers may already hold a redelivered ``update``."""

    @abstractmethod
    def counts_refusal(self, share: Share, grant: TaskGrant, device_id: str) -> bool:
        """Return whether a device's refusal of its task counts against this share."""

    @abstractmethod
    def all_answered(self, share: Share) -> bool:
        """Return whether nobody else is expected to report here (progress goes out at once)."""

    refuses_held_when_closed = True
    """Whether updates held for a round are refused once it closes here (else they wait)."""


class CohortPolicy(RoundPolicy):
    """A synchronous round: the selected devices, each once, on the round's base version."""

    def begin(self, opened: RoundOpened, strategy: Strategy, current: Weights) -> Any:
        """Return the strategy's empty state for the round."""
        return strategy.begin(opened.round, current)

    def place(
        self, update: ModelUpdate, open_round: int | None, last_closed: int | None
    ) -> Placement:
        """Fold the open round's updates, hold the next round's, refuse the rest as late."""
        if open_round is not None:
            if update.round == open_round:
                return Placement.FOLD
            # The next round's update overtook its announcement.
            return Placement.HOLD if update.round == open_round + 1 else Placement.LATE
        # Nothing open: the round after the last closed one may be announced soon.
        held = last_closed is None or update.round == last_closed + 1
        return Placement.HOLD if held else Placement.LATE

    def check_sender(self, share: Share, update: ModelUpdate) -> None:
        """Refuse a device that already reported, or was not selected."""
        if update.device_id in share.accepted_devices or update.device_id in share.aside_devices:
            raise Rejected(RejectReason.DUPLICATE, f"{update.device_id} already reported")
        if update.device_id not in share.selected:
            raise Rejected(RejectReason.NOT_SELECTED, f"{update.device_id} was not selected")

    def check_base(self, share: Share, update: ModelUpdate) -> None:
        """Refuse an update not trained on the round's base version."""
        base = share.opened.base_version
        if update.base_version != base:
            raise Rejected(
                RejectReason.STALE, f"trained on v{update.base_version}, round is on v{base}"
            )

    def client_update(
        self, share: Share, update: ModelUpdate, weights: Weights, control: Weights | None
    ) -> ClientUpdate:
        """Return the update as it came (SCAFFOLD's control delta beside it)."""
        return ClientUpdate(
            update.device_id,
            weights,
            update.num_examples,
            update.metrics,
            base_version=update.base_version,
            control_delta=control,
        )

    def ledger_rounds(self, share: Share, update: ModelUpdate) -> range:
        """Return the open round only: an earlier round's copy is late anyway."""
        return range(share.opened.round, share.opened.round + 1)

    def counts_refusal(self, share: Share, grant: TaskGrant, device_id: str) -> bool:
        """Count a selected device's refusal of this round's task, if it has not answered here."""
        return (
            grant.round == share.opened.round
            and device_id in share.selected
            and device_id not in share.reporters
        )

    def all_answered(self, share: Share) -> bool:
        """Return whether every selected device has answered here."""
        return len(share.reporters) >= len(share.opened.selected)


class BufferedPolicy(RoundPolicy):
    """A FedBuff server step: updates of recent versions, folded as staleness-weighted deltas.

    Parameters
    ----------
    store
        Where the versions an update may have trained on are read from.
    """

    BASES_KEPT = 4
    """Decoded versions kept for computing deltas (older ones are read from the store)."""
    refuses_held_when_closed = False

    def __init__(self, store: ModelStore) -> None:
        self._store = store
        self._bases: OrderedDict[tuple[str, int], Weights] = OrderedDict()

    def begin(self, opened: RoundOpened, strategy: Strategy, current: Weights) -> Any:
        """Keep the step's version decoded (the commonest base), return the empty buffer."""
        self._keep_base(opened.experiment_id, opened.base_version, current)
        return strategy.begin(opened.round, current)

    def place(
        self, update: ModelUpdate, open_round: int | None, last_closed: int | None
    ) -> Placement:
        """Fold updates of this step or earlier ones; hold the rest for the next step."""
        # A task outlives its step: its update goes into whichever step is open when it
        # arrives (staleness permitting), or waits for the next one.
        if open_round is not None and update.round <= open_round:
            return Placement.FOLD
        return Placement.HOLD

    def check_sender(self, share: Share, update: ModelUpdate) -> None:
        """Refuse a second answer to one task."""
        if update.task_id in share.tasks:
            raise Rejected(RejectReason.DUPLICATE, f"task {update.task_id} was already answered")

    def check_base(self, share: Share, update: ModelUpdate) -> None:
        """Refuse an update more than ``max_staleness`` versions old, or from the future."""
        strategy = share.strategy
        assert isinstance(strategy, FedBuff)
        try:
            strategy.staleness(share.state, update.base_version, update.device_id)
        except StaleUpdate as exc:
            raise Rejected(RejectReason.STALE, str(exc)) from exc
        except ValueError as exc:  # a version newer than the step's: never committed
            raise Rejected(RejectReason.UNKNOWN_ROUND, str(exc)) from exc

    def client_update(
        self, share: Share, update: ModelUpdate, weights: Weights, control: Weights | None
    ) -> ClientUpdate:
        """Return the update as its delta from the version it trained on."""
        base = self._base(update.experiment_id, update.base_version)
        delta = {name: np.subtract(value, base[name]) for name, value in weights.items()}
        return ClientUpdate(
            update.device_id,
            delta,
            update.num_examples,
            update.metrics,
            base_version=update.base_version,
        )

    def ledger_rounds(self, share: Share, update: ModelUpdate) -> range:
        """Return every step from its task's to the open one."""
        # Folded into any step from its task's to this one, then redelivered by a crash
        # between that step's checkpoint and its ack.
        return range(min(update.round, share.opened.round), share.opened.round + 1)

    def counts_refusal(self, share: Share, grant: TaskGrant, device_id: str) -> bool:
        """Count a refusal of a task of this step or an earlier one, once per task."""
        return grant.round <= share.opened.round and grant.task_id not in share.tasks

    def all_answered(self, share: Share) -> bool:
        """Return False: tasks keep flowing, there is no cohort to wait for."""
        return False

    def _base(self, experiment_id: str, version: int) -> Weights:
        """Return the weights of a version an update trained on (a few kept decoded)."""
        key = (experiment_id, version)
        if key in self._bases:
            self._bases.move_to_end(key)
            return self._bases[key]
        try:
            manifest = self._store.get_manifest(experiment_id, version)
            blob = self._store.get_blob(manifest.artifacts[WEIGHTS_ARTIFACT].sha256)
        except (StoreError, KeyError) as exc:
            raise Rejected(RejectReason.FETCH_FAILED, f"base version v{version}: {exc}") from exc
        weights = decode_weights(blob)
        self._keep_base(experiment_id, version, weights)
        return weights

    def _keep_base(self, experiment_id: str, version: int, weights: Weights) -> None:
        """Keep a version's weights decoded, dropping the least recently used beyond a few."""
        self._bases[(experiment_id, version)] = weights
        self._bases.move_to_end((experiment_id, version))
        while len(self._bases) > self.BASES_KEPT:
            self._bases.popitem(last=False)
