"""The worker's asynchronous intake: FedBuff server steps fed by updates from any recent version.

An asynchronous experiment has no cohort. Devices train continuously on the
version that was current when their task went out, so an update may arrive
several versions late. The worker keeps one buffer per experiment at the open
step's base version ``v``: an update trained on ``b <= v`` is folded as the
delta ``y - x_b`` (``x_b`` read from the store) weighted by ``1/sqrt(1 + v -
b)``; one more than ``max_staleness`` versions behind is refused as
``stale``, before its weights are even fetched. Every ``buffer_size``
accepted updates the step commits ``v + 1`` and reports it as the round's
outcome; updates arriving before the coordinator announces the next step
are held unacked until it does.

Durability follows the synchronous worker: folded updates are acked once a
checkpoint of the step holds them, and a step's last checkpoint (its whole
ledger) is written before its version. A successor that finds the version
already stored republishes the outcome from that checkpoint, and both it and
the worker that committed drop redelivered copies of the updates counted.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field

import numpy as np

from aggregator_service.checkpoints import Checkpoints, RoundCheckpoint
from aggregator_service.config import build_strategy
from aggregator_service.strategies import FedBuff, StaleUpdate
from aggregator_service.strategies.fedbuff import BufferState
from aggregator_service.tally import Tally
from aggregator_service.types import ClientUpdate, Weights
from aggregator_service.validation import (
    Rejected,
    check_examples,
    check_finite,
    decode_update_weights,
)
from aggregator_service.versions import WEIGHTS_ARTIFACT, stored_ref, write_version
from broker import (
    Delivery,
    ErrorReply,
    ModelUpdate,
    RejectReason,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    decode_weights,
    weights_spec,
)
from model_store import ModelStore, StoreError

log = logging.getLogger(__name__)

Outcome = RoundCommitted | RoundAbandoned
UpdateBytes = Callable[[ModelUpdate], bytes | memoryview]
"""Returns an update's weights bytes, inline or claimed from the store (the worker's rule)."""
Reject = Callable[[ModelUpdate, Rejected], None]
"""Tells a device its update was refused, and why."""
Publish = Callable[[Outcome], None]
"""Signs and publishes an outcome on its experiment's event topic (the worker's rule)."""


@dataclass
class _Step(Tally):
    """The server step being filled: one FedBuff buffer at the step's base version."""

    opened: RoundOpened
    current: Weights
    strategy: FedBuff
    buffer: BufferState
    tasks: set[str] = field(default_factory=set)
    reports: list[str] = field(default_factory=list)
    """The device of every update or refusal received while the step was open."""

    @property
    def full(self) -> bool:
        """Return whether the buffer holds its ``K`` updates."""
        return self.buffer.deltas.count >= self.strategy.buffer_size


class AsyncIntake:
    """Folds the updates of asynchronous experiments into FedBuff steps and commits them.

    Parameters
    ----------
    publish
        Publishes an outcome.
    store
        The model store: base versions to subtract, checkpoints, new versions.
    name
        The worker's name, the sender of its messages.
    checkpoint_every
        Checkpoint a step (and ack its folded updates) every this many folds.
    update_bytes
        Returns an update's weights bytes (the worker's inline / claim-check rule).
    reject
        Tells a device its update was refused.
    outcomes
        The worker's last outcome per experiment, repeated to a coordinator that missed it.
    """

    MAX_HELD = 10_000
    """Updates held while no step of their experiment is open, at most."""
    MAX_REFUSALS = 10
    """A step whose devices refused this many times ``K`` tasks is abandoned, not left spinning."""
    BASES_KEPT = 4
    """Decoded base versions kept for computing deltas (others are read from the store)."""

    def __init__(
        self,
        publish: Publish,
        store: ModelStore,
        *,
        name: str,
        checkpoint_every: int,
        update_bytes: UpdateBytes,
        reject: Reject,
        outcomes: MutableMapping[str, Outcome],
    ) -> None:
        self._publish = publish
        self._store = store
        self._checkpoints = Checkpoints(store)
        self._name = name
        self._checkpoint_every = checkpoint_every
        self._update_bytes = update_bytes
        self._reject = reject
        self._outcomes = outcomes
        self._known: set[str] = set()
        self._steps: dict[str, _Step] = {}
        self._closed: dict[str, int] = {}
        self._previous: dict[str, set[str]] = {}
        self._held: dict[str, list[tuple[ModelUpdate, Delivery]]] = {}
        self._bases: OrderedDict[tuple[str, int], Weights] = OrderedDict()

    def knows(self, experiment_id: str) -> bool:
        """Return whether ``experiment_id`` was announced as asynchronous."""
        return experiment_id in self._known

    def open(self, opened: RoundOpened) -> None:
        """Open an announced step (repeats are ignored), then fold the updates held for it."""
        exp = opened.experiment_id
        self._known.add(exp)
        if self._closed.get(exp, -1) >= opened.round:
            return
        step = self._steps.get(exp)
        if step is not None and step.opened.round >= opened.round:
            return
        if step is not None:  # the coordinator moved on without this step's outcome
            log.warning("%s step %d superseded by %d", exp, step.opened.round, opened.round)
            del self._steps[exp]
            for delivery in step.pending:
                delivery.nack(requeue=True)
        latest = self._store.latest_version(exp)
        if latest is not None and latest > opened.base_version:
            # A predecessor committed this step and died before announcing it.
            self._republish(opened)
        else:
            step = self._new_step(opened)
            self._steps[exp] = step
            if step.full:  # resumed from the final checkpoint of a step not yet written
                self._close(step, deadline=False)
        for update, delivery in self._held.pop(exp, []):
            self.handle(update, delivery)

    def close(self, experiment_id: str, round_number: int) -> None:
        """Close a step at its deadline: commit what it holds, or abandon it below the minimum."""
        step = self._steps.get(experiment_id)
        if step is not None and step.opened.round == round_number:
            self._close(step, deadline=True)

    def handle(self, update: ModelUpdate, delivery: Delivery) -> None:
        """Fold one update into its experiment's open step, hold it, or refuse it."""
        exp = update.experiment_id
        step = self._steps.get(exp)
        if step is None or update.round > step.opened.round:
            held = self._held.setdefault(exp, [])
            if len(held) < self.MAX_HELD:
                held.append((update, delivery))  # unacked until the next step opens
                return
            self._reject(update, Rejected(RejectReason.UNKNOWN_ROUND, f"no step of {exp} open"))
            delivery.ack()
            return
        if update.message_id in step.counted or update.message_id in self._previous.get(exp, ()):
            delivery.ack()  # a redelivered copy of an update already counted
            return
        try:
            self._fold(step, update)
        except Rejected as rejection:
            step.rejected[rejection.reason.value] += 1
            self._reject(update, rejection)
            delivery.ack()
            return
        step.pending.append(delivery)
        if step.full:
            self._close(step, deadline=False)
        elif len(step.pending) >= self._checkpoint_every:
            self._checkpoint(step)

    def device_failed(self, experiment_id: str, reply: ErrorReply) -> None:
        """Count a device's refusal of its task against the open step."""
        step = self._steps.get(experiment_id)
        if step is None:
            return
        step.reports.append(reply.sender)
        step.rejected[f"device_{reply.code}"] += 1
        refusals = sum(n for reason, n in step.rejected.items() if reason.startswith("device_"))
        if refusals >= self.MAX_REFUSALS * step.strategy.buffer_size:
            self._close(step, deadline=True)

    def _new_step(self, opened: RoundOpened) -> _Step:
        """Return an empty step on the announced version, resumed from its newest checkpoint."""
        current = decode_weights(self._store.get_blob(opened.model.sha256))
        strategy = build_strategy(opened.strategy)
        if not isinstance(strategy, FedBuff):
            raise TypeError(f"{strategy.name} has no asynchronous rounds")
        # The step's base version is the strategy's whole server state.
        strategy.set_version(opened.base_version)
        step = _Step(opened, current, strategy, strategy.begin(opened.round, current))
        self._keep_base(opened.experiment_id, opened.base_version, current)
        checkpoint = self._checkpoints.latest(opened.experiment_id, opened.round)
        if checkpoint is not None:
            step.buffer.merge(checkpoint.partial)
            step.accepted = list(checkpoint.accepted)
            step.counted = set(checkpoint.accepted)
            step.accepted_devices = set(checkpoint.accepted_devices)
            step.rejected = Counter(checkpoint.rejected)
            step.reports = list(checkpoint.reporters)
            step.examples, step.loss_sum = checkpoint.examples, checkpoint.loss_sum
            step.checkpoints = checkpoint.sequence + 1
            log.info(
                "resumed %s step %d from checkpoint %d (%d updates)",
                opened.experiment_id,
                opened.round,
                checkpoint.sequence,
                len(checkpoint.accepted),
            )
        return step

    def _fold(self, step: _Step, update: ModelUpdate) -> None:
        """Validate ``update`` and fold its staleness-weighted delta, or raise ``Rejected``."""
        step.reports.append(update.device_id)
        if update.task_id in step.tasks:
            raise Rejected(RejectReason.DUPLICATE, f"task {update.task_id} was already answered")
        try:
            staleness = step.strategy.staleness(step.buffer, update.base_version, update.device_id)
        except StaleUpdate as exc:
            raise Rejected(RejectReason.STALE, str(exc)) from exc
        except ValueError as exc:  # a version this worker has not committed
            raise Rejected(RejectReason.UNKNOWN_ROUND, str(exc)) from exc
        check_examples(update.num_examples)
        weights = decode_update_weights(self._update_bytes(update), weights_spec(step.current))
        check_finite(weights)
        base = self._base(update.experiment_id, update.base_version)
        delta = {name: np.subtract(value, base[name]) for name, value in weights.items()}
        client = ClientUpdate(
            update.device_id,
            delta,
            update.num_examples,
            update.metrics,
            base_version=update.base_version,
        )
        try:
            step.strategy.fold(step.buffer, client)
        except ValueError as exc:
            raise Rejected(RejectReason.STRATEGY_REFUSED, str(exc)) from exc
        step.count_accepted(update)
        step.tasks.add(update.task_id)
        log.debug(
            "%s step %d: folded %s (staleness %d)",
            step.opened.experiment_id,
            step.opened.round,
            update.message_id,
            staleness,
        )

    def _base(self, experiment_id: str, version: int) -> Weights:
        """Return the weights of a model version an update trained on (a few kept decoded)."""
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

    def _checkpoint(self, step: _Step) -> None:
        """Make the step's folded updates durable, then ack them."""
        step.checkpoint(self._checkpoints, step.opened, step.buffer.partial(), list(step.reports))

    def _close(self, step: _Step, *, deadline: bool) -> None:
        """End the step: commit or abandon it, publish the outcome, settle its updates."""
        opened = step.opened
        del self._steps[opened.experiment_id]
        try:
            outcome = self._outcome(step)
            self._publish(outcome)
        except Exception:
            # Nothing is lost: checkpointed updates stay in the store, the rest go
            # back to the broker, and the coordinator announces the step again.
            log.exception("could not close %s step %d; retried", opened.experiment_id, opened.round)
            for delivery in step.pending:
                delivery.nack(requeue=True)
            return
        self._ended(opened.experiment_id, opened.round, outcome, step.counted)
        for delivery in step.pending:
            delivery.ack()
        log.info(
            "closed %s step %d (%s): %s",
            opened.experiment_id,
            opened.round,
            "deadline" if deadline else "buffer full",
            type(outcome).__name__,
        )

    def _outcome(self, step: _Step) -> Outcome:
        """Commit the step, or describe why it is abandoned."""
        opened = step.opened
        reason = f"{len(step.accepted)} accepted updates, {opened.min_reports} needed"
        if len(step.accepted) >= max(opened.min_reports, 1):
            try:
                return self._commit(step)
            except Rejected as exc:  # the aggregate itself is not finite: never written
                reason = f"the aggregate is not finite: {exc.detail}"
        return RoundAbandoned(
            experiment_id=opened.experiment_id,
            round=opened.round,
            reason=reason,
            reported=len(step.reports),
            accepted=len(step.accepted),
            rejected=dict(step.rejected),
            sender=self._name,
        )

    def _commit(self, step: _Step) -> RoundCommitted:
        """Write the step's ledger, then its model as the next version; describe it."""
        opened = step.opened
        # The ledger goes first: a successor that finds the version reports it from here.
        self._checkpoint(step)
        new = step.strategy.finish(opened.round, step.current, step.buffer)
        assert new is not None, "a step with accepted updates always aggregates"
        check_finite(new)  # a non-finite aggregate is never written (raises Rejected)
        version = opened.base_version + 1
        ref = write_version(
            self._store,
            opened.experiment_id,
            opened.base_version,
            version,
            new,
            step.strategy.state_dict(),
        )
        self._keep_base(opened.experiment_id, version, new)
        return RoundCommitted(
            experiment_id=opened.experiment_id,
            round=opened.round,
            version=version,
            model=ref,
            reported=len(step.reports),
            accepted=tuple(step.accepted),
            accepted_devices=tuple(sorted(step.accepted_devices)),
            rejected=dict(step.rejected),
            num_examples=step.examples,
            metrics={"train_loss": step.loss_sum / step.examples} if step.examples else {},
            sender=self._name,
        )

    def _republish(self, opened: RoundOpened) -> None:
        """Report a step a predecessor committed, from the ledger it checkpointed first."""
        exp, version = opened.experiment_id, opened.base_version + 1
        checkpoint = self._checkpoints.latest(exp, opened.round)
        ledger = checkpoint or RoundCheckpoint(sequence=0)
        outcome = RoundCommitted(
            experiment_id=exp,
            round=opened.round,
            version=version,
            model=stored_ref(self._store, exp, version),
            reported=len(ledger.reporters),
            accepted=tuple(ledger.accepted),
            accepted_devices=tuple(ledger.accepted_devices),
            rejected=dict(ledger.rejected),
            num_examples=ledger.examples,
            metrics={"train_loss": ledger.loss_sum / ledger.examples} if ledger.examples else {},
            sender=self._name,
        )
        self._publish(outcome)
        self._ended(exp, opened.round, outcome, set(ledger.accepted))
        log.info("%s step %d was committed before; outcome published again", exp, opened.round)

    def _ended(self, experiment_id: str, number: int, outcome: Outcome, counted: set[str]) -> None:
        """Remember a closed step: its outcome (for repeats) and its ledger (for dedupe)."""
        self._closed[experiment_id] = number
        self._outcomes[experiment_id] = outcome
        # Updates folded into the step are acked only after it closed: a crash in
        # between redelivers them during the next step, where they must not count.
        self._previous[experiment_id] = counted
