"""The aggregator worker: consumes updates, validates and folds them, commits rounds.

It keeps one open round per experiment. An update's delivery is acknowledged
only once its effect is durable: rejections at once (the verdict is final),
accepted updates when the round's new model version is in the store, so a
worker that dies mid-round has every counted update redelivered to its
successor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

from aggregator_service.async_intake import AsyncIntake, Outcome
from aggregator_service.checkpoints import Checkpoints
from aggregator_service.config import build_strategy, is_asynchronous
from aggregator_service.gate import UpdateGate
from aggregator_service.links import upload_name
from aggregator_service.strategies import Strategy, WeightedSum
from aggregator_service.tally import Tally
from aggregator_service.types import ClientUpdate, Weights
from aggregator_service.validation import (
    Rejected,
    check_examples,
    check_finite,
    decode_update_weights,
)
from aggregator_service.versions import read_strategy_state, write_version
from broker import (
    CloseRound,
    Delivery,
    ErrorReply,
    MessageKind,
    ModelUpdate,
    RejectReason,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    Transport,
    UpdateRejected,
    decode_weights,
    encode,
    weights_spec,
)
from broker.identity import SERVICE_NAME, Identity, KeyRing
from broker.messages import TaskGrant
from broker.topics import Topics
from broker.verify import Refusals, Verifier
from model_store import ModelStore
from model_store.store import PresignedAccess

log = logging.getLogger(__name__)

CONTROL_DELTA = "control_delta"
"""Prefix of the control-variate delta tensors a SCAFFOLD update carries."""


@dataclass
class _OpenRound(Tally):
    """Everything the worker tracks about the round it is aggregating."""

    opened: RoundOpened
    current: Weights
    strategy: Strategy
    state: WeightedSum
    reporters: set[str] = field(default_factory=set)

    @property
    def reported(self) -> int:
        """Return how many selected devices have answered (an update or a refusal)."""
        return len(self.reporters)

    @property
    def spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Return the names, shapes and dtypes every update must have."""
        return weights_spec(self.current)


class AggregatorWorker:
    """Folds the updates of every open round into a running aggregate.

    Parameters
    ----------
    transport
        The bus: round control in, updates in, outcomes and rejections out.
    store
        The model store: versions, checkpoints, uploaded updates.
    identity
        The worker's own key; its name is the worker's name on the bus.
    service_key
        The service's pinned public key: round control and task grants must
        carry its signature.
    topics
        The deployment's topics (its namespace).
    group
        The shared update queue (default: the namespace's worker group).
    """

    MAX_EARLY = 10_000
    """Updates held for a round not yet announced, at most."""
    MAX_EARLY_BYTES = 64 << 20
    """Bytes of updates held for a round not yet announced, at most."""
    CONTROL_MAX_AGE_S = 600.0
    """Round control signed longer ago than this is a replay (the service re-signs repeats)."""

    def __init__(
        self,
        transport: Transport,
        store: ModelStore,
        *,
        identity: Identity,
        service_key: bytes,
        topics: Topics | None = None,
        group: str | None = None,
        checkpoint_every: int = 32,
    ) -> None:
        name = identity.name
        self._identity = identity
        self._topics = topics or Topics()
        self.refusals = Refusals(f"worker {name}")
        self._gate = UpdateGate(service_key, self._topics)
        self._control = Verifier(
            KeyRing({SERVICE_NAME: service_key}),
            kinds=(MessageKind.ROUND_OPENED, MessageKind.CLOSE_ROUND),
            max_age_s=self.CONTROL_MAX_AGE_S,
            topic_for=lambda message: self._topics.control(message.experiment_id),
        )
        self._transport = transport
        self._checkpoints = Checkpoints(store)
        self._checkpoint_every = checkpoint_every
        self._group = group or self._topics.updates_group
        self._store = store
        self._lock = threading.RLock()
        self._rounds: dict[str, _OpenRound] = {}
        self._outcomes: dict[str, RoundCommitted | RoundAbandoned] = {}
        # experiment -> (strategy config, instance, model version its state belongs to)
        self._strategies: dict[str, tuple[str, Strategy, int]] = {}
        self._early: list[tuple[ModelUpdate, Delivery]] = []
        self._early_bytes = 0
        self._last_closed: dict[str, int] = {}
        # Asynchronous (FedBuff) experiments: server steps over updates from any recent version.
        self._async = AsyncIntake(
            self._publish_outcome,
            store,
            name=name,
            checkpoint_every=checkpoint_every,
            update_bytes=self._update_bytes,
            reject=self._reject,
            outcomes=self._outcomes,
        )

    def start(self) -> None:
        """Subscribe to round control and to the shared update queue."""
        self._transport.subscribe(self._topics.all_control, self._on_control)
        self._transport.subscribe(self._topics.all_updates, self._on_update, group=self._group)

    def _publish_outcome(self, outcome: Outcome) -> None:
        """Sign and publish a round's outcome, with this worker's refusal counts so far."""
        outcome = dataclasses.replace(outcome, refused=self.refusals.snapshot())
        topic = self._topics.events(outcome.experiment_id)
        self._transport.publish(topic, encode(outcome, self._identity))

    def _on_control(self, delivery: Delivery) -> None:
        message = self.refusals.admit(delivery, self._control.open_delivery)
        if message is None:
            return
        assert isinstance(message, RoundOpened | CloseRound)
        with self._lock:
            if isinstance(message, RoundOpened | CloseRound) and self._repeat_outcome(message):
                pass
            elif isinstance(message, RoundOpened) and is_asynchronous(message.strategy):
                self._open_async(message)
            elif isinstance(message, RoundOpened):
                self._open(message)
            elif isinstance(message, CloseRound) and self._async.knows(message.experiment_id):
                self._async.close(message.experiment_id, message.round)
            elif isinstance(message, CloseRound):
                self._close(message.experiment_id, message.round, deadline=True)
        delivery.ack()

    def _repeat_outcome(self, message: RoundOpened | CloseRound) -> bool:
        """Publish a closed round's outcome again, for a coordinator that missed it."""
        outcome = self._outcomes.get(message.experiment_id)
        if outcome is None or outcome.round != message.round:
            return False
        # The coordinator keeps announcing (or closing) a round until it hears how it
        # ended; it may have been down when the outcome was first published.
        self._publish_outcome(outcome)
        return True

    def _open(self, opened: RoundOpened) -> None:
        exp = opened.experiment_id
        if self._last_closed.get(exp, -1) >= opened.round:
            return  # a redelivered announcement of a round already closed
        existing = self._rounds.get(exp)
        if existing is not None and existing.opened.round >= opened.round:
            return
        current = decode_weights(self._store.get_blob(opened.model.sha256))
        strategy = self._strategy_for(opened)
        rnd = _OpenRound(opened, current, strategy, strategy.begin(opened.round, current))
        self._resume(rnd)
        self._rounds[exp] = rnd
        for update, delivery in self._take_early(exp):
            self._handle_update(update, delivery)

    def _take_early(self, experiment_id: str) -> list[tuple[ModelUpdate, Delivery]]:
        """Remove and return the updates held for ``experiment_id``."""
        held = [(u, d) for u, d in self._early if u.experiment_id == experiment_id]
        self._early = [(u, d) for u, d in self._early if u.experiment_id != experiment_id]
        self._early_bytes -= sum(len(d.body) for _, d in held)
        return held

    def _open_async(self, opened: RoundOpened) -> None:
        """Open an asynchronous step, with the updates held before the experiment was known."""
        exp = opened.experiment_id
        self._async.open(opened)
        for update, delivery in self._take_early(exp):
            self._async.handle(update, delivery)

    def _strategy_for(self, opened: RoundOpened) -> Strategy:
        """Return the experiment's strategy, carrying its server state across rounds."""
        key = json.dumps(opened.strategy, sort_keys=True)
        cached = self._strategies.get(opened.experiment_id)
        if cached is not None and cached[0] == key and cached[2] == opened.base_version:
            return cached[1]
        # A new worker, or a round after an abandoned one: rebuild from the store.
        strategy = build_strategy(opened.strategy)
        strategy.load_state_dict(
            read_strategy_state(self._store, opened.experiment_id, opened.base_version)
        )
        self._strategies[opened.experiment_id] = (key, strategy, opened.base_version)
        return strategy

    def _resume(self, rnd: _OpenRound) -> None:
        """Restore the round's newest checkpoint, if another worker left one."""
        checkpoint = self._checkpoints.latest(rnd.opened.experiment_id, rnd.opened.round)
        if checkpoint is None or not isinstance(rnd.state, WeightedSum):
            return
        rnd.state.sums = checkpoint.sums
        rnd.state.total_weight = checkpoint.total_weight
        rnd.state.count = checkpoint.count
        rnd.accepted = checkpoint.accepted
        rnd.counted = set(checkpoint.accepted)
        rnd.accepted_devices = set(checkpoint.accepted_devices)
        rnd.rejected = Counter(checkpoint.rejected)
        rnd.reporters = set(checkpoint.reporters)
        rnd.examples = checkpoint.examples
        rnd.loss_sum = checkpoint.loss_sum
        rnd.checkpoints = checkpoint.sequence + 1
        log.info(
            "resumed %s round %d from checkpoint %d (%d updates)",
            rnd.opened.experiment_id,
            rnd.opened.round,
            checkpoint.sequence,
            checkpoint.count,
        )

    def _checkpoint(self, rnd: _OpenRound) -> None:
        """Make the folded updates durable, then ack them (bounds what is held unacked)."""
        if not isinstance(rnd.state, WeightedSum):
            return  # a state the worker cannot checkpoint keeps its acks until the commit
        rnd.checkpoint(self._checkpoints, rnd.opened, rnd.state, sorted(rnd.reporters))

    def _should_hold(self, update: ModelUpdate) -> bool:
        """Return whether ``update`` may belong to a round this worker has not heard of yet.

        That is the round after the open one (its update overtook the
        announcement), or any round of an experiment this worker knows nothing
        about (it started mid-round; the coordinator re-announces open rounds).
        """
        rnd = self._rounds.get(update.experiment_id)
        if rnd is not None:
            return update.round == rnd.opened.round + 1
        last = self._last_closed.get(update.experiment_id)
        return last is None or update.round == last + 1

    def _on_update(self, delivery: Delivery) -> None:
        admitted = self.refusals.admit(delivery, self._gate.admit)
        if admitted is None:
            return
        with self._lock:
            message = admitted.message
            if isinstance(message, ModelUpdate):
                self._handle_update(message, delivery)
                return
            self._device_failed(admitted.grant, message)
        delivery.ack()

    def _device_failed(self, grant: TaskGrant, reply: ErrorReply) -> None:
        """Count a device's refusal of its task against the round the task belongs to."""
        experiment_id = grant.experiment_id
        log.info(
            "device %s could not train: %s %s", reply.sender, reply.code[:40], reply.detail[:200]
        )
        if self._async.knows(experiment_id):
            self._async.device_failed(experiment_id, reply)
            return
        rnd = self._rounds.get(experiment_id)
        in_round = rnd is not None and grant.round == rnd.opened.round
        if rnd is not None and in_round and reply.sender in rnd.opened.selected:
            rnd.reporters.add(reply.sender)
            rnd.rejected[f"device_{reply.code}"] += 1
            self._close_if_complete(rnd)

    def _handle_update(self, update: ModelUpdate, delivery: Delivery) -> None:
        if self._async.knows(update.experiment_id):
            self._async.handle(update, delivery)
            return
        rnd = self._rounds.get(update.experiment_id)
        if self._should_hold(update) and self._may_hold(delivery):
            self._early.append((update, delivery))  # unacked, until its round is announced
            self._early_bytes += len(delivery.body)
            return
        if rnd is not None and update.message_id in rnd.counted:
            delivery.ack()  # a redelivered copy of an update already counted
            return
        try:
            if rnd is None or update.round != rnd.opened.round:
                past = self._last_closed.get(update.experiment_id, -1)
                if rnd is not None:
                    past = max(past, rnd.opened.round - 1)
                late = update.round <= past
                reason = RejectReason.ROUND_CLOSED if late else RejectReason.UNKNOWN_ROUND
                raise Rejected(reason, f"round {update.round} is not open")
            self._fold(rnd, update)
        except Rejected as rejection:
            if rnd is not None and update.round == rnd.opened.round:
                rnd.rejected[rejection.reason.value] += 1
            self._reject(update, rejection)
            delivery.ack()
            if rnd is not None:
                self._close_if_complete(rnd)
            return
        rnd.pending.append(delivery)
        if not self._close_if_complete(rnd) and len(rnd.pending) >= self._checkpoint_every:
            self._checkpoint(rnd)

    def _may_hold(self, delivery: Delivery) -> bool:
        """Return whether one more early update fits the bounds on held updates."""
        return (
            len(self._early) < self.MAX_EARLY
            and self._early_bytes + len(delivery.body) <= self.MAX_EARLY_BYTES
        )

    def _close_if_complete(self, rnd: _OpenRound) -> bool:
        """Close the round once the target is met or every selected device has answered."""
        opened = rnd.opened
        if len(rnd.accepted) >= opened.target_reports or rnd.reported >= len(opened.selected):
            self._close(opened.experiment_id, opened.round, deadline=False)
            return True
        return False

    def _fold(self, rnd: _OpenRound, update: ModelUpdate) -> None:
        """Validate ``update`` against the open round and fold it, or raise ``Rejected``."""
        if update.device_id in rnd.accepted_devices:
            raise Rejected(RejectReason.DUPLICATE, f"{update.device_id} already reported")
        if update.device_id not in rnd.opened.selected:
            raise Rejected(RejectReason.NOT_SELECTED, f"{update.device_id} was not selected")
        # Counted before validation: a device whose update is refused has answered.
        rnd.reporters.add(update.device_id)
        if update.base_version != rnd.opened.base_version:
            raise Rejected(
                RejectReason.STALE,
                f"trained on v{update.base_version}, round is on v{rnd.opened.base_version}",
            )
        check_examples(update.num_examples)
        with_control = rnd.strategy.takes_control_delta
        spec = rnd.spec
        if with_control:  # SCAFFOLD: the update also carries the device's control delta
            spec = {**spec, **{f"{CONTROL_DELTA}/{k}": v for k, v in spec.items()}}
        weights = decode_update_weights(self._update_bytes(update), spec)
        check_finite(weights)
        control = None
        if with_control:
            control = {k: weights.pop(f"{CONTROL_DELTA}/{k}") for k in rnd.spec}
        client = ClientUpdate(
            update.device_id,
            weights,
            update.num_examples,
            update.metrics,
            base_version=update.base_version,
            control_delta=control,
        )
        try:
            rnd.strategy.fold(rnd.state, client)
        except ValueError as exc:  # the rule refuses it: a missing metric, too many updates
            raise Rejected(RejectReason.STRATEGY_REFUSED, str(exc)) from exc
        rnd.count_accepted(update)

    def _update_bytes(self, update: ModelUpdate) -> bytes | memoryview:
        """Return the update's weights bytes, inline or from the store by reference."""
        if update.inline_weights is not None:
            return update.inline_weights
        if update.weights is None:
            raise Rejected(RejectReason.UNDECODABLE, "update carries no weights")
        sha256 = update.weights.sha256
        try:
            if isinstance(self._store, PresignedAccess):
                # The device PUT its bytes straight to the object store: claim
                # them (checksum-verified) under the name its task was given;
                # a repeated claim (a redelivered update) returns the blob.
                name = upload_name(update.experiment_id, update.task_id)
                return self._store.claim_upload(name, sha256)
            return self._store.get_blob(sha256)
        except Exception as exc:  # the store's own errors: missing or corrupt blob
            raise Rejected(RejectReason.FETCH_FAILED, str(exc)) from exc

    def _reject(self, update: ModelUpdate, rejection: Rejected) -> None:
        log.info("rejected update %s from %s: %s", update.message_id, update.device_id, rejection)
        notice = UpdateRejected(
            experiment_id=update.experiment_id,
            round=update.round,
            update_id=update.message_id,
            reason=rejection.reason,
            detail=rejection.detail,
        )
        topic = self._topics.device(update.device_id)
        self._transport.publish(topic, encode(notice, self._identity))

    def _close(self, experiment_id: str, round_number: int, *, deadline: bool) -> None:
        rnd = self._rounds.get(experiment_id)
        if rnd is None or rnd.opened.round != round_number:
            return
        del self._rounds[experiment_id]
        try:
            outcome = self._outcome(rnd)
            self._publish_outcome(outcome)
        except Exception:
            # Nothing is lost: checkpointed updates stay in the store, the rest go
            # back to the broker, and the coordinator announces the round again.
            log.exception(
                "could not close %s round %d; it will be retried", experiment_id, round_number
            )
            self._strategies.pop(experiment_id, None)  # finish() may have advanced it
            for delivery in rnd.pending:
                delivery.nack(requeue=True)
            return
        self._last_closed[experiment_id] = round_number
        self._outcomes[experiment_id] = outcome
        for delivery in rnd.pending:
            delivery.ack()
        log.info(
            "closed %s round %d (%s): %s",
            experiment_id,
            round_number,
            "deadline" if deadline else "complete",
            type(outcome).__name__,
        )

    def _outcome(self, rnd: _OpenRound) -> RoundCommitted | RoundAbandoned:
        """Commit the round, or describe why it is abandoned."""
        opened = rnd.opened
        reason = None
        if len(rnd.accepted) < max(opened.min_reports, 1):
            reason = f"{len(rnd.accepted)} accepted reports, {opened.min_reports} needed"
        else:
            try:
                return self._commit(rnd)
            except ValueError as exc:  # the rule cannot aggregate these (Krum with n <= 2f+2)
                reason = f"{rnd.strategy.name} could not aggregate: {exc}"
            except Rejected as exc:  # the aggregate itself is not finite: never written
                reason = f"the aggregate is not finite: {exc.detail}"
            # finish() may have moved the server state (momentum, moments): the next
            # round on this base version rebuilds it from the store.
            self._strategies.pop(opened.experiment_id, None)
        return RoundAbandoned(
            experiment_id=opened.experiment_id,
            round=opened.round,
            reason=reason,
            reported=rnd.reported,
            accepted=len(rnd.accepted),
            rejected=dict(rnd.rejected),
        )

    def _commit(self, rnd: _OpenRound) -> RoundCommitted:
        """Write the round's aggregate as the next model version and describe it."""
        opened = rnd.opened
        new = rnd.strategy.finish(opened.round, rnd.current, rnd.state)
        assert new is not None, "a round with accepted updates always aggregates"
        check_finite(new)
        version = opened.base_version + 1
        ref = write_version(
            self._store,
            opened.experiment_id,
            opened.base_version,
            version,
            new,
            rnd.strategy.state_dict(),
        )
        key, strategy, _ = self._strategies[opened.experiment_id]
        self._strategies[opened.experiment_id] = (key, strategy, version)
        return RoundCommitted(
            experiment_id=opened.experiment_id,
            round=opened.round,
            version=version,
            model=ref,
            reported=rnd.reported,
            accepted=tuple(rnd.accepted),
            accepted_devices=tuple(sorted(rnd.accepted_devices)),
            rejected=dict(rnd.rejected),
            num_examples=rnd.examples,
            metrics={"train_loss": rnd.loss_sum / rnd.examples} if rnd.examples else {},
        )
