"""The aggregator worker: consumes updates, validates and folds them into its share of a round.

One pipeline takes every update: frame in (signature and grant checked by the
gate), placed (folded, held for a round not announced yet, or refused as
late), validated, folded into this worker's share. The round's policy
(``policies``: a cohort round or a buffered FedBuff step), chosen once from
the experiment's strategy, answers the questions on which the two differ.

It keeps one open round per experiment. An update's delivery is acknowledged
only once its effect is durable: rejections at once (the verdict is final),
accepted updates once a checkpoint of this worker's share holds them. A
worker that dies mid-round leaves its last checkpoint on the round's roster,
to be combined, and its unacked updates go back to the queue, to be folded
by the others: never both, never neither (see ``checkpoints``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from dataclasses import dataclass
from typing import Any

from aggregator_service.checkpoints import AsideUpdate, Checkpoints, RoundCheckpoint, Sealed
from aggregator_service.combine import Combiner, Outcome
from aggregator_service.config import build_strategy
from aggregator_service.gate import UpdateGate
from aggregator_service.links import upload_name
from aggregator_service.policies import BufferedPolicy, CohortPolicy, Placement, RoundPolicy
from aggregator_service.secagg.strategy import MASKED, SecureSum
from aggregator_service.share import Share
from aggregator_service.strategies import FedBuff, Strategy, merge_state, state_partial
from aggregator_service.tally import loss_sum
from aggregator_service.validation import (
    Rejected,
    check_examples,
    check_finite,
    decode_update_weights,
)
from aggregator_service.versions import read_strategy_state
from broker import (
    CloseRound,
    CombineRound,
    Delivery,
    ErrorReply,
    Message,
    MessageKind,
    ModelUpdate,
    PartialReady,
    RejectReason,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    RoundProgress,
    StrategySpec,
    Subscription,
    Transport,
    UpdateRejected,
    WorkerAlive,
    decode_weights,
    encode,
)
from broker.errors import BrokerError
from broker.identity import SERVICE_NAME, Identity, KeyRing
from broker.messages import ERROR_CODES, TaskGrant
from broker.secagg.messages import RoundMasked
from broker.topics import Topics
from broker.verify import Refusals, Verifier
from model_store import ModelStore
from model_store.store import PresignedAccess

log = logging.getLogger(__name__)

CONTROL_DELTA = "control_delta"
"""Prefix of the control-variate delta tensors a SCAFFOLD update carries."""


class _NotSaved(Exception):
    """An update set aside could not be saved: it goes back to the queue uncounted."""


@dataclass(frozen=True)
class _Flushed:
    """A round this worker closed: its last checkpoint, kept for repeats and for combining."""

    round: int
    share: RoundCheckpoint | None


class AggregatorWorker:
    """Folds its share of every open round into a partial; combines rounds when asked.

    Several workers may consume one update queue: each folds the updates it
    receives into a partial aggregate, tells the coordinator who reported
    (``RoundProgress``), and on ``CloseRound`` makes its partial durable
    (``PartialReady``). The coordinator then hands ``CombineRound`` to one
    worker, which seals the round and merges every partial (``combine``).

    Parameters
    ----------
    transport
        The bus: round control in, updates in, progress and outcomes out.
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
    checkpoint_every
        Checkpoint a round's share (and ack its updates) every this many folds.
    """

    MAX_EARLY = 10_000
    """Updates held for a round not yet announced, at most."""
    MAX_EARLY_BYTES = 64 << 20
    """Bytes of updates held for a round not yet announced, at most."""
    CONTROL_MAX_AGE_S = 600.0
    """Round control signed longer ago than this is a replay (the service re-signs repeats)."""
    ALIVE_EVERY_S = 15.0
    """How often the worker tells the coordinator it is up (``WorkerAlive``)."""
    STORE_RETRY_S = 1.0
    """How long an update that could not be saved waits before it goes back to the queue."""
    PROGRESS_EVERY_S = 0.1
    """Longest a report waits before the coordinator hears of it (``RoundProgress`` batches)."""

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
        self._name = name
        self._topics = topics or Topics()
        self.refusals = Refusals(f"worker {name}")
        self._gate = UpdateGate(service_key, self._topics)
        self._control = Verifier(
            KeyRing({SERVICE_NAME: service_key}),
            kinds=(MessageKind.ROUND_OPENED, MessageKind.CLOSE_ROUND, MessageKind.COMBINE_ROUND),
            max_age_s=self.CONTROL_MAX_AGE_S,
            topic_for=self._control_topic,
        )
        self._transport = transport
        self._checkpoints = Checkpoints(store)
        self._checkpoint_every = checkpoint_every
        self._group = group or self._topics.updates_group
        self._store = store
        self._lock = threading.RLock()
        self._rounds: dict[str, Share] = {}
        self._cohort = CohortPolicy()
        self._buffered = BufferedPolicy(store)
        self._policies: dict[str, RoundPolicy] = {}
        self._recent: dict[str, set[str]] = {}
        """Update ids counted in this worker's last closed share of each experiment."""
        self._flushed: dict[str, _Flushed] = {}
        self._outcomes: dict[str, RoundCommitted | RoundAbandoned] = {}
        # experiment -> (strategy config, instance, model version its state belongs to)
        self._strategies: dict[str, tuple[StrategySpec, Strategy, int]] = {}
        self._early: list[tuple[ModelUpdate, Delivery]] = []
        self._early_bytes = 0
        self._progress_timer: threading.Timer | None = None
        self._stopping = threading.Event()
        self._shares: list[Subscription] = []  # of the group's updates and combines
        self._handed_back: list[Delivery] = []  # updates that came while this worker left
        self._last_closed: dict[str, int] = {}
        self._combiner = Combiner(
            store, name=name, strategy_for=self._strategy_at, own_share=self._own_share
        )

    def start(self) -> None:
        """Subscribe to round control, the combiners' queue and the shared update queue.

        Then say so to the coordinator, and again every ``ALIVE_EVERY_S`` (on a
        daemon thread) until ``stop``: it is ready to run rounds once it has
        heard from a worker.
        """
        self._transport.subscribe(self._topics.all_control, self._on_control)
        combiners = self._topics.combiners_group(self._group)
        self._shares = [
            self._transport.subscribe(self._topics.all_combine, self._on_control, group=combiners),
            self._transport.subscribe(self._topics.all_updates, self._on_update, group=self._group),
        ]
        threading.Thread(target=self._say_alive, name="fedmq-worker-alive", daemon=True).start()

    def stop(self) -> None:
        """Leave the group: take no more updates or combines, save the shares in hand.

        Over MQTT the worker's session outlives it, kept for a restart under
        the same name; still subscribed, it would go on taking its share of
        every round's updates, which would wait there while the rounds closed
        without them. A share saved here is merged by whichever worker
        combines its round; the updates in it are acked. The transport's
        owner closes the transport afterwards.

        The order suits every transport: shares are saved and acked while the
        subscriptions stand (cancelling one closes its AMQP channel, which
        takes the acks with it and requeues the rest); then, unsubscribed,
        the worker hands back what it holds unsaved (updates early for their
        round, a share the store refused, updates that came while it left),
        which over MQTT republishes them to the group's other workers.
        """
        self._stopping.set()
        shares, self._shares = self._shares, []
        unsaved: list[Delivery] = []
        try:
            with self._lock:
                for rnd in list(self._rounds.values()):  # a sealed round leaves the dict
                    if (rnd.dirty or rnd.pending) and self._try_checkpoint(rnd):
                        self._send_progress(rnd)
                    unsaved.extend(rnd.pending)  # the store refused: folded, not saved
                    rnd.pending = []
                unsaved.extend(delivery for _, delivery in self._early)
                self._early, self._early_bytes = [], 0
            for subscription in shares:
                subscription.cancel()
            with self._lock:
                unsaved.extend(self._handed_back)
                self._handed_back = []
            for delivery in unsaved:
                delivery.nack(requeue=True)
        except BrokerError as exc:  # a broker already gone: the session keeps what is unacked
            log.warning("worker %s left without saying so: %s", self._name, exc)

    def _say_alive(self) -> None:
        while not self._stopping.is_set():
            try:
                alive = encode(WorkerAlive(group=self._group), self._identity)
                self._transport.publish(self._topics.workers, alive)
            except BrokerError as exc:  # said again at the next beat
                log.info("could not say this worker is alive: %s", exc)
            self._stopping.wait(self.ALIVE_EVERY_S)

    def _control_topic(self, message: Message) -> str:
        """Return the topic a control message must have come on (combine requests: their own)."""
        assert isinstance(message, RoundOpened | CloseRound | CombineRound)
        if isinstance(message, CombineRound):
            return self._topics.combine(message.experiment_id)
        return self._topics.control(message.experiment_id)

    def _publish(self, message: Message) -> None:
        """Sign and publish a message on its experiment's event topic."""
        assert isinstance(
            message, RoundProgress | PartialReady | RoundCommitted | RoundAbandoned | RoundMasked
        )
        self._transport.publish(
            self._topics.events(message.experiment_id), encode(message, self._identity)
        )

    def _publish_outcome(self, outcome: Outcome) -> None:
        """Sign and publish a round's outcome, with this worker's refusal counts so far."""
        self._publish(dataclasses.replace(outcome, refused=self.refusals.snapshot()))

    def _on_control(self, delivery: Delivery) -> None:
        message = self.refusals.admit(delivery, self._control.open_delivery)
        if message is None:
            return
        assert isinstance(message, RoundOpened | CloseRound | CombineRound)
        with self._lock:
            if isinstance(message, CombineRound):
                self._combine(message)
            elif self._repeat_outcome(message):
                pass
            elif isinstance(message, RoundOpened):
                self._open(message)
            else:
                self._flush(message.experiment_id, message.round)
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
            # Closed here: a coordinator that restarted since learns what this share holds.
            flushed = self._flushed.get(exp)
            if flushed is not None and flushed.round == opened.round and flushed.share:
                share = flushed.share
                self._publish(
                    RoundProgress(
                        experiment_id=exp,
                        round=opened.round,
                        reported=tuple(share.reporters),
                        accepted=(*share.accepted_devices, *share.aside_devices),
                    )
                )
            return
        existing = self._rounds.get(exp)
        if existing is not None and existing.opened.round >= opened.round:
            # A repeat: the coordinator may have lost track (a restart), so tell it
            # again everything this worker has counted of the round.
            if existing.opened.round == opened.round and existing.reporters:
                self._progress(
                    existing, tuple(existing.reporters), tuple(existing.answered_devices)
                )
            return
        if existing is not None:
            self._flush(exp, existing.opened.round)
        current = decode_weights(self._store.get_blob(opened.model.sha256))
        strategy = self._strategy_at(exp, opened.strategy, opened.base_version)
        policy: RoundPolicy = self._buffered if strategy.buffered else self._cohort
        self._policies[exp] = policy
        rnd = Share(opened, current, strategy, policy.begin(opened, strategy, current))
        if not self._resume(rnd):
            self._closed(exp, opened.round)  # sealed already: combined without this worker
            return
        self._rounds[exp] = rnd
        for update, delivery in self._take_early(exp):
            self._handle_update(update, delivery)

    def _take_early(self, experiment_id: str) -> list[tuple[ModelUpdate, Delivery]]:
        """Remove and return the updates held for ``experiment_id``."""
        held = [(u, d) for u, d in self._early if u.experiment_id == experiment_id]
        self._early = [(u, d) for u, d in self._early if u.experiment_id != experiment_id]
        self._early_bytes -= sum(len(d.body) for _, d in held)
        return held

    def _strategy_at(self, experiment_id: str, spec: StrategySpec, version: int) -> Strategy:
        """Return the experiment's strategy with its server state at ``version``."""
        cached = self._strategies.get(experiment_id)
        if cached is not None and cached[0] == spec and cached[2] == version:
            return cached[1]
        # A new worker, a round another worker combined, or one after an abandoned
        # round: the state is the one stored with the version.
        strategy = build_strategy(spec)
        strategy.load_state_dict(read_strategy_state(self._store, experiment_id, version))
        if isinstance(strategy, FedBuff):
            strategy.set_version(version)  # its server state is the version it steps from
        self._strategies[experiment_id] = (spec, strategy, version)
        return strategy

    def _resume(self, rnd: Share) -> bool:
        """Restore this worker's newest checkpoint of the round; False if the round is sealed."""
        exp, number = rnd.opened.experiment_id, rnd.opened.round
        if self._checkpoints.is_sealed(exp, number):
            return False
        checkpoint = self._checkpoints.latest(exp, number, self._name)
        if checkpoint is None:
            return True
        merge_state(rnd.state, checkpoint.partial)
        rnd.restore(checkpoint)
        rnd.saved = checkpoint
        log.info(
            "resumed %s round %d from checkpoint %d (%d updates)",
            exp,
            number,
            checkpoint.sequence,
            len(checkpoint.accepted),
        )
        return True

    def _checkpoint(self, rnd: Share) -> None:
        """Make this worker's share durable, then ack what it holds.

        Raises ``Sealed`` (acking nothing) if the round was sealed first.
        """
        opened = rnd.opened
        self._join(rnd)
        partial = state_partial(rnd.state)
        rnd.saved = rnd.checkpoint(
            self._checkpoints, opened, partial, sorted(rnd.reporters), self._name
        )
        rnd.dirty = False
        self._progress_soon()

    def _on_update(self, delivery: Delivery) -> None:
        admitted = self.refusals.admit(delivery, self._gate.admit)
        if admitted is None:
            return
        with self._lock:
            if self._stopping.is_set():  # leaving: handed back to the group once unsubscribed
                self._handed_back.append(delivery)
                return
            message = admitted.message
            if isinstance(message, ModelUpdate):
                self._handle_update(message, delivery)
                return
            self._device_failed(admitted.grant, message)
        delivery.ack()

    def _device_failed(self, grant: TaskGrant, reply: ErrorReply) -> None:
        """Count a device's refusal of its task against the round the task belongs to."""
        experiment_id = grant.experiment_id
        rnd = self._rounds.get(experiment_id)
        policy = self._policies.get(experiment_id)
        if (
            rnd is not None
            and policy is not None
            and policy.counts_refusal(rnd, grant, reply.sender)
        ):
            # Logged once counted: a device repeating its refusal floods no log.
            log.info(
                "device %s could not train: %s %s", reply.sender, reply.code, reply.detail[:200]
            )
            rnd.reporters.add(reply.sender)
            rnd.tasks.add(grant.task_id)
            code = reply.code if reply.code in ERROR_CODES else "other"
            rnd.rejected[f"device_{code}"] += 1
            rnd.dirty = True
            self._progress(rnd, (reply.sender,), ())

    def _handle_update(self, update: ModelUpdate, delivery: Delivery) -> None:
        """Fold ``update`` into its round's share, hold it for a round to come, or refuse it."""
        exp = update.experiment_id
        rnd = self._rounds.get(exp)
        placement = self._place(update, rnd)
        if placement is Placement.HOLD and self._may_hold(delivery):
            self._early.append((update, delivery))  # unacked, until its round is announced
            self._early_bytes += len(delivery.body)
            return
        if rnd is not None and update.message_id in rnd.counted:
            # A copy of an update counted here: acked once a checkpoint holds it.
            _log_copy(update, "this worker's share")
            if self._saved_here(rnd, update.message_id):
                delivery.ack()
            else:
                rnd.pending.append(delivery)
            return
        if rnd is not None and self._counted_elsewhere(rnd, update, delivery):
            _log_copy(update, "a saved share")
            delivery.ack()
            return
        try:
            if rnd is None or placement is not Placement.FOLD:
                past = self._last_closed.get(exp, -1)
                if rnd is not None:
                    past = max(past, rnd.opened.round - 1)
                late = update.round <= past
                reason = RejectReason.ROUND_CLOSED if late else RejectReason.UNKNOWN_ROUND
                raise Rejected(reason, f"round {update.round} is not open")
            self._join(rnd)
            self._fold(rnd, update, aside=self._may_be_folded_elsewhere(rnd, update, delivery))
        except Sealed:
            self._sealed_under(rnd)  # type: ignore[arg-type]
            self._handle_update(update, delivery)  # now held for the next step, or late
            return
        except _NotSaved:
            log.exception("could not set %s aside; returned to the queue", update.message_id)
            # Not at once: while the store is out, an update sent straight back
            # would come round again and again.
            self._stopping.wait(self.STORE_RETRY_S)
            delivery.nack(requeue=True)
            return
        except Rejected as rejection:
            if rnd is not None and placement is Placement.FOLD:
                rnd.rejected[rejection.reason.value] += 1
                rnd.dirty = True
                if update.device_id in rnd.reporters:
                    self._progress(rnd, (update.device_id,), ())
            self._reject(update, rejection)
            delivery.ack()
            return
        rnd.pending.append(delivery)
        self._progress(rnd, (update.device_id,), (update.device_id,))
        if len(rnd.accepted) >= rnd.opened.target_reports:
            # Enough here alone: the first target_reports count, as over-selection
            # intends. (With several workers, what the others folded before the
            # coordinator closed the round counts too.)
            self._flush(update.experiment_id, rnd.opened.round)
        elif len(rnd.pending) >= self._checkpoint_every and not rnd.strategy.keeps_updates:
            self._try_checkpoint(rnd)

    def _place(self, update: ModelUpdate, rnd: Share | None) -> Placement:
        """Return where an update goes; a round of an experiment unknown here is awaited.

        A worker that started mid-round knows nothing of the experiment yet:
        the coordinator re-announces open rounds, so its updates are held.
        """
        policy = self._policies.get(update.experiment_id)
        if policy is None:
            return Placement.HOLD
        open_round = None if rnd is None else rnd.opened.round
        return policy.place(update, open_round, self._last_closed.get(update.experiment_id))

    def _try_checkpoint(self, rnd: Share) -> bool:
        """Checkpoint the share; on failure keep its updates unacked for the next try."""
        try:
            self._checkpoint(rnd)
            return True
        except Sealed:
            self._sealed_under(rnd)
        except Exception:  # the store's own errors: nothing is acked, nothing is lost
            opened = rnd.opened
            log.exception("could not save %s round %d here", opened.experiment_id, opened.round)
        return False

    def _join(self, rnd: Share) -> None:
        """Put this worker on the round's roster before its first fold (``Sealed`` if late).

        The coordinator waits for the partial of every worker on the roster, so
        a worker whose progress is still on its way is not combined without.
        """
        if not rnd.joined:
            opened = rnd.opened
            self._checkpoints.join(opened.experiment_id, opened.round, self._name)
            rnd.joined = True

    @staticmethod
    def _saved_here(rnd: Share, update_id: str) -> bool:
        """Return whether this worker's last checkpoint of the round holds ``update_id``."""
        saved = rnd.saved
        return saved is not None and (update_id in saved.accepted or update_id in saved.aside)

    def _counted_elsewhere(self, rnd: Share, update: ModelUpdate, delivery: Delivery) -> bool:
        """Return whether a saved share holds it: this worker's last round's, or another's."""
        exp = update.experiment_id
        if update.message_id in self._recent.get(exp, ()):
            return True
        if not delivery.redelivered or update.round > rnd.opened.round:
            return False
        policy = self._policies[exp]
        for number in policy.ledger_rounds(rnd, update):
            # The open round's own ledger is in memory; closed ones are read whole.
            skip = self._name if number == rnd.opened.round else None
            if update.message_id in self._checkpoints.counted_by_others(exp, number, skip):
                return True
        return False

    def _may_be_folded_elsewhere(self, rnd: Share, update: ModelUpdate, delivery: Delivery) -> bool:
        """Return whether another worker may hold ``update`` in a share it has not saved yet.

        A redelivered update whose first receiver is alive but lost its
        connection: that worker does not know its deliveries went back to the
        queue, and may still save its share with the update in it. Only a
        worker on the round's roster can (a worker joins before its first fold).
        """
        if not delivery.redelivered:
            return False
        exp, number = update.experiment_id, rnd.opened.round
        return any(w != self._name for w in self._checkpoints.roster(exp, number))

    def _progress(self, rnd: Share, reported: tuple[str, ...], accepted: tuple[str, ...]) -> None:
        """Note devices that answered, for the coordinator (it alone sees every worker's count).

        Batched, and sent off the handler's path: a publish waits for the
        broker's acknowledgement, which queues behind the deliveries in flight
        on the same connection. The batch goes after ``PROGRESS_EVERY_S`` from
        a timer thread, at the close, or at once when every selected device
        has answered here.
        """
        rnd.unsent[0].extend(reported)
        rnd.unsent[1].extend(accepted)
        if self._policies[rnd.opened.experiment_id].all_answered(rnd):
            self._send_progress(rnd)
        else:
            self._progress_soon()

    def _progress_soon(self) -> None:
        """Have the timer thread send what is noted, ``PROGRESS_EVERY_S`` from now."""
        if self._progress_timer is None:
            self._progress_timer = threading.Timer(self.PROGRESS_EVERY_S, self._progress_due)
            self._progress_timer.daemon = True
            self._progress_timer.start()

    def _progress_due(self) -> None:
        with self._lock:
            due = [m for m in map(self._progress_message, list(self._rounds.values())) if m]
        # Published outside the lock, so the handler folds on meanwhile. One sent
        # after the round's PartialReady only counts again what the close counted.
        try:
            for message in due:
                try:
                    self._publish(message)
                except BrokerError as exc:
                    # Not lost for good: the close, and each repeated announcement, carry it.
                    log.warning("could not send round progress: %s", exc)
        finally:
            # Only now may another timer start: while a publish waits for its ack
            # (behind a backlog being read), new timers would pile up behind it.
            with self._lock:
                self._progress_timer = None
                if any(rnd.unsent[0] or rnd.unsent[1] for rnd in self._rounds.values()):
                    self._progress_soon()

    def _send_progress(self, rnd: Share) -> None:
        """Publish the devices noted since the last ``RoundProgress``, if any."""
        message = self._progress_message(rnd)
        if message is not None:
            self._publish(message)

    def _progress_message(self, rnd: Share) -> RoundProgress | None:
        """Return the devices noted since the last ``RoundProgress`` (None: none), as sent."""
        reported, accepted = rnd.unsent
        if not reported and not accepted:
            return None
        rnd.unsent = ([], [])
        opened = rnd.opened
        return RoundProgress(
            experiment_id=opened.experiment_id,
            round=opened.round,
            reported=tuple(reported),
            accepted=tuple(accepted),
            folded=len(rnd.accepted) + len(rnd.aside),
        )

    def _may_hold(self, delivery: Delivery) -> bool:
        """Return whether one more early update fits the bounds on held updates."""
        return (
            len(self._early) < self.MAX_EARLY
            and self._early_bytes + len(delivery.body) <= self.MAX_EARLY_BYTES
        )

    def _fold(self, rnd: Share, update: ModelUpdate, *, aside: bool = False) -> None:
        """Validate ``update`` against the open round and fold it, or raise ``Rejected``.

        ``aside``: fold it alone and save that apart (``AsideUpdate``), for the
        combiner to merge only if no other worker's saved share counted it.
        """
        policy = self._policies[update.experiment_id]
        policy.check_sender(rnd, update)
        # Counted before validation: a device whose update is refused has answered.
        rnd.reporters.add(update.device_id)
        rnd.dirty = True
        policy.check_base(rnd, update)  # before the weights are fetched: a stale one costs none
        check_examples(update.num_examples)
        if not math.isfinite(rnd.loss_sum + loss_sum(update)):
            raise Rejected(RejectReason.NON_FINITE, "its loss times its examples overflows the sum")
        with_control = rnd.strategy.takes_control_delta
        spec = rnd.spec
        masked = isinstance(rnd.strategy, SecureSum)
        if with_control:  # SCAFFOLD: the update also carries the device's control delta
            spec = {**spec, **{f"{CONTROL_DELTA}/{k}": v for k, v in spec.items()}}
        if masked:  # secure aggregation: integers modulo 2^32, meaningless until summed
            spec = {k: (shape, MASKED.name) for k, (shape, _dtype) in spec.items()}
        weights = decode_update_weights(self._update_bytes(update), spec)
        if not masked:
            check_finite(weights)
        control = None
        if with_control:
            control = {k: weights.pop(f"{CONTROL_DELTA}/{k}") for k in rnd.spec}
        client = policy.client_update(rnd, update, weights, control)
        state = rnd.strategy.begin(rnd.opened.round, rnd.current) if aside else rnd.state
        try:
            rnd.strategy.fold(state, client)
        except ValueError as exc:  # the rule refuses it: a missing metric, too many updates
            raise Rejected(RejectReason.STRATEGY_REFUSED, str(exc)) from exc
        if aside:
            self._set_aside(rnd, update, state)
        else:
            rnd.count_accepted(update)
        rnd.tasks.add(update.task_id)

    def _set_aside(self, rnd: Share, update: ModelUpdate, state: Any) -> None:
        """Save one update's folded state apart; the next checkpoint lists it."""
        aside = AsideUpdate(
            update_id=update.message_id,
            device=update.device_id,
            round=update.round,
            examples=update.num_examples,
            loss_sum=loss_sum(update),
            partial=state_partial(state),
        )
        opened = rnd.opened
        try:
            written = self._checkpoints.set_aside(opened.experiment_id, opened.round, aside)
        except Exception as exc:  # the store's own errors
            raise _NotSaved(str(exc)) from exc
        if not written:
            raise Rejected(RejectReason.DUPLICATE, "another device's update has this id")
        rnd.count_aside(update)
        log.info(
            "set aside %s from %s: redelivered while another worker may hold it unsaved",
            update.message_id,
            update.device_id,
        )

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
            # Here every update reached the store through its put_blob, which named
            # it by hashing it (the service's upload view): the device's signed claim
            # names those exact bytes without a second hash.
            return self._store.get_blob(sha256, verify=False)
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

    def _flush(self, experiment_id: str, round_number: int) -> None:
        """Stop taking the round's updates; make this worker's share durable and say so."""
        rnd = self._rounds.get(experiment_id)
        if rnd is None or rnd.opened.round != round_number:
            self._closed(experiment_id, round_number)
            flushed = self._flushed.get(experiment_id)
            if flushed is not None and flushed.round == round_number:
                self._partial_ready(experiment_id, flushed)  # a repeated close
            return
        if (rnd.dirty or rnd.pending) and not self._try_checkpoint(rnd):
            return  # sealed (its updates went back to the queue), or retried at the next close
        self._send_progress(rnd)  # before PartialReady: the coordinator counts, then combines
        del self._rounds[experiment_id]
        # Acked after this share's last checkpoint; a copy redelivered before then
        # (a crash in between) may arrive during the next round, where it must not count.
        self._recent[experiment_id] = rnd.counted
        self._closed(experiment_id, round_number)
        if rnd.joined and rnd.saved is None:  # resumed, and nothing new since
            rnd.saved = self._checkpoints.latest(experiment_id, round_number, self._name)
        flushed = _Flushed(round_number, rnd.saved)
        self._flushed[experiment_id] = flushed
        self._partial_ready(experiment_id, flushed)
        log.info(
            "closed %s round %d: %d update(s) in this worker's share",
            experiment_id,
            round_number,
            len(rnd.accepted),
        )

    def _closed(self, experiment_id: str, round_number: int) -> None:
        """Remember a round as closed here, and refuse what was held for it (cohort rounds)."""
        last = max(self._last_closed.get(experiment_id, -1), round_number)
        self._last_closed[experiment_id] = last
        policy = self._policies.get(experiment_id, self._cohort)
        if not policy.refuses_held_when_closed:
            return  # a buffered step's updates wait for the next step
        late = [
            (u, d) for u, d in self._early if u.experiment_id == experiment_id and u.round <= last
        ]
        if late:
            self._early = [(u, d) for u, d in self._early if (u, d) not in late]
            self._early_bytes -= sum(len(d.body) for _, d in late)
            for update, delivery in late:
                self._reject(
                    update, Rejected(RejectReason.ROUND_CLOSED, f"round {update.round} is closed")
                )
                delivery.ack()

    def _partial_ready(self, experiment_id: str, flushed: _Flushed) -> None:
        share = flushed.share
        self._publish(
            PartialReady(
                experiment_id=experiment_id,
                round=flushed.round,
                sequence=-1 if share is None else share.sequence,
            )
        )

    def _sealed_under(self, rnd: Share) -> None:
        """Hand the share's updates back to the queue: the round was sealed before they were saved.

        They were never acked, so the broker delivers them again, and whoever
        gets them refuses them as late (a buffered step's wait for the next step):
        nothing is counted twice or silently lost.
        """
        opened = rnd.opened
        log.warning(
            "%s round %d was sealed before %d update(s) here were saved; returned to the queue",
            opened.experiment_id,
            opened.round,
            len(rnd.pending),
        )
        self._rounds.pop(opened.experiment_id, None)
        for delivery in rnd.pending:
            delivery.nack(requeue=True)
        rnd.pending.clear()
        self._closed(opened.experiment_id, opened.round)

    def _own_share(
        self, experiment_id: str, round_number: int, sequence: int
    ) -> RoundCheckpoint | None:
        flushed = self._flushed.get(experiment_id)
        if flushed is None or flushed.round != round_number or flushed.share is None:
            return None
        return flushed.share if flushed.share.sequence == sequence else None

    def _combine(self, request: CombineRound) -> None:
        """Seal a closed round, merge every worker's share, publish the outcome."""
        exp = request.experiment_id
        self._flush(exp, request.round)  # this worker's own share goes in, if it has one
        try:
            outcome, advanced = self._combiner.combine(request)
        except Exception:
            self._strategies.pop(exp, None)  # finish() may have advanced it: reload next time
            raise
        if advanced is None:
            self._strategies.pop(exp, None)
        else:
            self._strategies[exp] = (request.strategy, advanced, request.base_version + 1)
        if isinstance(outcome, RoundMasked):
            # Not an outcome yet: the coordinator gathers the seeds and asks again.
            self._publish(outcome)
            log.info(
                "%s round %d: masked sum of %d device(s) sealed",
                exp,
                request.round,
                len(outcome.devices),
            )
            return
        self._outcomes[exp] = outcome
        self._publish_outcome(outcome)
        log.info("combined %s round %d: %s", exp, request.round, type(outcome).__name__)


def _log_copy(update: ModelUpdate, where: str) -> None:
    """Log a redelivered copy of an update already counted: after a crash, says what came back."""
    log.info(
        "%s round %d: update %s from %s is already counted in %s; this copy is dropped",
        update.experiment_id,
        update.round,
        update.message_id,
        update.sender,
        where,
    )
