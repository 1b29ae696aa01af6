"""The round coordinator: it draws cohorts, opens rounds and records their outcomes.

It owns the experiment's state machine (idle -> running -> idle, with rounds
training -> committed | abandoned) and drives workers through the bus; it
never touches an update itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from aggregator_service.checkpoints import Checkpoints
from aggregator_service.config import ExperimentConfig
from aggregator_service.errors import Conflict, NotFound
from aggregator_service.links import ArtifactLinks, StoreLinks
from aggregator_service.persistence import (
    Database,
    DeviceRecord,
    ExperimentRecord,
    RoundRecord,
    RoundSummary,
)
from aggregator_service.persistence.database import DatabaseError
from aggregator_service.rounds.asynchronous import AsyncRounds
from aggregator_service.rounds.catalog import ExperimentCatalog, Packager
from aggregator_service.rounds.closing import RoundClosing, RoundStatus
from aggregator_service.rounds.evaluation import Evaluations, EvaluatorFactory
from aggregator_service.rounds.pool import ANY
from aggregator_service.rounds.presence import Presence
from aggregator_service.rounds.records import RoundDevices, Waiting, new_round_record
from aggregator_service.rounds.recovery import in_flight_rounds
from aggregator_service.rounds.registry import DeviceRegistry, Registration
from aggregator_service.rounds.tasks import TaskDispatch
from aggregator_service.secagg.coordinator import DeviceStage, SecureRounds
from broker import (
    CheckIn,
    CheckOut,
    Delivery,
    Message,
    MessageKind,
    PartialReady,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    RoundProgress,
    Transport,
    encode,
)
from broker.identity import Identity, KeyRing, encode_key
from broker.secagg.messages import RoundMasked, SecAggKeys, SecAggReveal, SecAggShares
from broker.topics import Topics
from broker.verify import Refusal, Refusals, Verifier, check_fresh, refuse
from model_store import ModelStore
from model_store.artifacts import WEIGHTS

log = logging.getLogger(__name__)

RoundListener = Callable[[RoundRecord], None]


class RoundService:
    """Coordinates experiments and their rounds over a transport."""

    REPEAT_S = RoundClosing.REPEAT_S
    """How often a round's current phase message is sent again (see ``RoundClosing``)."""
    ALIVE_MAX_AGE_S = 120.0
    """A ``WorkerAlive`` signed longer ago than this says nothing about now."""
    SEEN_EVERY_S = 10.0
    """How long a heartbeat's last-seen time may wait in memory before it is written.

    Times are written in batches (see ``LastSeen``); a device coming online
    is written at the next ``tick``, and ``close`` writes whatever is pending.
    """
    CHECK_IN_MAX_AGE_S = 600.0
    """A check-in signed longer ago than this is a replay, not a device online now."""
    MAX_PLATFORM_CHARS = 32
    STOPPED = "stopped by the operator"
    """The reason recorded for a round ``stop`` abandons."""

    def __init__(
        self,
        transport: Transport,
        store: ModelStore,
        db: Database,
        *,
        identity: Identity,
        worker_keys: KeyRing,
        topics: Topics | None = None,
        registry: DeviceRegistry | None = None,
        max_examples: int = 1_000_000,
        evaluator_factory: EvaluatorFactory | None = None,
        links: ArtifactLinks | None = None,
        packagers: Mapping[str, Packager] | None = None,
        max_inline_bytes: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        name = identity.name
        self._transport = transport
        self._store = store
        self._db = db
        self._identity = identity
        self._topics = topics or Topics()
        self.registry = registry or DeviceRegistry(db, clock=clock)
        self._worker_keys = worker_keys
        self.refusals = Refusals("coordinator")
        self.worker_refusals: dict[str, dict[str, int]] = {}
        """Each worker's own refusal counts, as its latest outcome reported them."""
        self._max_examples = max_examples
        # Check-outs may be last wills the broker sends hours after signing: no age limit.
        self._devices = Verifier(
            self.registry.key,
            kinds=(
                MessageKind.CHECK_IN,
                MessageKind.CHECK_OUT,
                MessageKind.SECAGG_KEYS,
                MessageKind.SECAGG_SHARES,
                MessageKind.SECAGG_REVEAL,
            ),
            max_age_s=None,
            topic_for=lambda message: self._topics.checkin(message.sender),
        )
        self._workers = Verifier(
            worker_keys,
            kinds=(
                MessageKind.ROUND_COMMITTED,
                MessageKind.ROUND_ABANDONED,
                MessageKind.ROUND_PROGRESS,
                MessageKind.PARTIAL_READY,
                MessageKind.ROUND_MASKED,
            ),
            max_age_s=None,
            topic_for=lambda message: self._topics.events(message.experiment_id),
        )
        self._alive = Verifier(
            worker_keys,
            kinds=(MessageKind.WORKER_ALIVE,),
            max_age_s=self.ALIVE_MAX_AGE_S,
            topic_for=lambda _message: self._topics.workers,
        )
        self._heard: dict[str, float] = {}  # worker -> when it last said anything
        self._catalog = ExperimentCatalog(db, store, packagers=packagers or {}, clock=clock)
        self._evaluations = Evaluations(store, evaluator_factory, self._catalog.config)
        self._links = links or StoreLinks(store)
        self._tasks = TaskDispatch(
            transport,
            store,
            self._links,
            identity=identity,
            topics=self._topics,
            grant_limits=self._grant_limit,
            aggregator_keys=worker_keys.items,
            max_inline_bytes=max_inline_bytes,
            clock=clock,
        )
        self._clock = clock
        self._name = name
        self._lock = threading.RLock()
        self._presence = Presence(db, seen_every_s=self.SEEN_EVERY_S, clock=clock)
        self._online = self._presence.online
        self._waiting: dict[str, int] = {}
        """Experiments waiting for devices -> how many online devices would start their round."""
        checkpoints = Checkpoints(store)
        self._closing = RoundClosing(
            self._sign_and_publish,
            self._topics,
            clock,
            roster=checkpoints.roster,
            saved=checkpoints.saved_devices,
        )
        self._listeners: list[RoundListener] = []
        self._secure = SecureRounds(
            db,
            store,
            publish=self._sign_and_publish,
            topics=self._topics,
            combine=self._closing.unmasked,
            abandon=self._abandon_secure,
            narrow=self._closing.narrow,
            clock=clock,
        )
        # Asynchronous (FedBuff) experiments: tasks flow without a cohort barrier.
        self._async = AsyncRounds(
            db,
            clock=clock,
            announce=self._announce,
            send_tasks=lambda opened, config, refs: self._tasks.send(
                opened, config, refs, later=[]
            ),
            sender=name,
        )

    def start(self, *, recovery_grace_s: float = 0.0) -> None:
        """Listen for check-ins and round outcomes; pick up rounds left in flight.

        After a restart the online pool is empty until devices check in again.
        A cohort drawn from whichever devices came back first would not be the
        one the uninterrupted run draws, so no new round starts until every
        device seen in the last ``recovery_grace_s + SEEN_EVERY_S`` seconds has
        checked in again, or ``recovery_grace_s`` has passed (rounds in flight
        are re-announced at once and finish as usual).
        """
        self.registry.preload()
        with self._lock:
            awaited = self._presence.await_return(recovery_grace_s)
            if awaited:
                log.info(
                    "waiting up to %.0f s for %d device(s) seen before the restart",
                    recovery_grace_s,
                    awaited,
                )
            for exp in self._db.experiments():
                if exp.state == "waiting":
                    self._waiting[exp.id] = self._catalog.config(exp).rounds.minimum
            rounds = in_flight_rounds(
                self._db, self._store, self._links, self._catalog.config, sender=self._name
            )
            for opened in rounds:
                self._track(opened)
                config = self._catalog.config(opened.experiment_id)
                if config.secure_aggregation is not None:
                    self._secure.recover(opened, config)
                    if self._current_round(opened.experiment_id, opened.round) is None:
                        continue  # its protocol could not be rebuilt: abandoned
                log.info("recovered %s round %d in flight", opened.experiment_id, opened.round)
                # The crash may have cut the task dispatch short; a device that
                # already reported is refused as a duplicate, so sending all is safe.
                self._resend_tasks(opened)
        self._transport.subscribe(self._topics.all_checkins, self._on_checkin)
        self._transport.subscribe(self._topics.all_events, self._on_event)
        self._transport.subscribe(self._topics.workers, self._on_worker_alive)

    def close(self) -> None:
        """Write the last-seen times still in memory (call before closing the database)."""
        self._presence.write()

    def add_listener(self, listener: RoundListener) -> None:
        """Call ``listener`` with each round record once the round has ended."""
        self._listeners.append(listener)

    # -- experiments ---------------------------------------------------------------

    def create_experiment(self, config: ExperimentConfig) -> str:
        """Publish the initial model as version 0 and record the experiment; return its id.

        Raises ``ConfigError`` for a platform this service cannot package for.
        """
        return self._catalog.create(config)

    def request_rounds(self, experiment_id: str, count: int) -> None:
        """Queue ``count`` more rounds; they run one after another."""
        if count < 1:
            raise Conflict("count must be at least 1")
        with self._lock:
            exp = self._db.experiment(experiment_id)
            self._db.update_experiment(experiment_id, rounds_requested=exp.rounds_requested + count)
            if exp.state == "idle":
                self._db.update_experiment(experiment_id, state="running")
                self._start_round(experiment_id)

    def stop_after_current_round(self, experiment_id: str) -> None:
        """Pause: drop the rounds still queued; the round in progress finishes normally."""
        with self._lock:
            exp = self._db.experiment(experiment_id)
            values: dict[str, object] = {"rounds_requested": exp.current_round}
            if exp.state == "waiting":  # no round in flight: nothing left to wait for
                values["state"] = "idle"
                self._waiting.pop(experiment_id, None)
            self._db.update_experiment(experiment_id, **values)

    def stop(self, experiment_id: str) -> None:
        """Abandon the round in flight now (reason ``STOPPED``) and drop the rounds queued.

        Workers hear the round closed once and are never asked to combine it
        (an outcome that still arrives is ignored: the round has ended). A
        round whose combine request is already out cannot be recalled: its
        version may be in the store, where the next round on the same base
        would find it, so it ends with its outcome, as after a pause.
        """
        with self._lock:
            self.stop_after_current_round(experiment_id)
            rnd = self._round_in_flight(experiment_id)
            if rnd is None:
                return
            if not self._withdraw(rnd, self.STOPPED):
                log.info(
                    "%s round %d is being combined: it ends with its outcome",
                    experiment_id,
                    rnd.number,
                )

    def delete_experiment(self, experiment_id: str) -> None:
        """Remove an idle experiment and its rounds (its model versions stay in the store).

        Raises ``Conflict`` while a round is in flight: stop it first.
        """
        with self._lock:
            self._db.experiment(experiment_id)
            if self._round_in_flight(experiment_id) is not None:
                raise Conflict(f"{experiment_id} has a round in flight: stop it first")
            self._db.delete_experiment(experiment_id)
            self._evaluations.forget(experiment_id)
            self._catalog.forget(experiment_id)
            self._waiting.pop(experiment_id, None)
        log.info("deleted experiment %s", experiment_id)

    def waiting(self, exp: ExperimentRecord) -> Waiting | None:
        """Return why a waiting experiment waits: its devices online and needed (else None)."""
        if exp.state != "waiting":
            return None
        needed = self._catalog.config(exp).rounds.minimum
        with self._lock:
            online = self._online.count(exp.id)
            grace = self._presence.grace_until()
        return Waiting(online=online, needed=needed, grace_until=grace)

    def round_status(self, experiment_id: str, number: int) -> RoundStatus | None:
        """Return a round's live phase and counts (None: it is not in flight)."""
        with self._lock:
            return self._closing.status(experiment_id, number)

    def experiment(self, experiment_id: str) -> ExperimentRecord:
        """Return an experiment's state."""
        return self._db.experiment(experiment_id)

    def experiments(self) -> list[ExperimentRecord]:
        """Return every experiment."""
        return self._db.experiments()

    def rounds(self, experiment_id: str) -> list[RoundRecord]:
        """Return an experiment's rounds (raises ``NotFound`` for an unknown experiment)."""
        self._db.experiment(experiment_id)
        return self._db.rounds(experiment_id)

    def round_summaries(self, experiment_id: str, *, max_ids: int) -> list[RoundSummary]:
        """Return an experiment's rounds, listing ids only where at most ``max_ids`` of them."""
        self._db.experiment(experiment_id)
        return self._db.round_summaries(experiment_id, max_ids=max_ids)

    def round_devices(
        self, experiment_id: str, number: int, *, offset: int, limit: int
    ) -> RoundDevices:
        """Return a page of a round's selected devices, and of its accepted updates.

        Raises ``NotFound`` for an unknown experiment or round.
        """
        self._db.experiment(experiment_id)
        record = self._db.round_record(experiment_id, number)
        if record is None:
            raise NotFound(f"experiment {experiment_id} has no round {number}")
        accepted = set(record.accepted_devices)
        if record.state == "training":
            with self._lock:
                accepted = self._closing.accepted(experiment_id, number)
        return RoundDevices.page(record, accepted, offset=offset, limit=limit)

    def model_weights(self, experiment_id: str, version: int | None = None) -> tuple[int, bytes]:
        """Return ``(version, safetensors bytes)`` of the global model (latest by default)."""
        exp = self._db.experiment(experiment_id)
        v = exp.model_version if version is None else version
        if not 0 <= v <= exp.model_version:
            raise NotFound(f"experiment {experiment_id} has no model version {v}")
        manifest = self._store.get_manifest(experiment_id, v)
        return v, self._store.get_blob(manifest.artifacts[WEIGHTS].sha256)

    # -- devices ------------------------------------------------------------------

    def register_device(
        self, platform: str, *, public_key: str | None = None, device_id: str | None = None
    ) -> Registration:
        """Register a device's identity (see ``DeviceRegistry.register``)."""
        return self.registry.register(platform, public_key=public_key, device_id=device_id)

    @property
    def public_key(self) -> bytes:
        """Return the service's public key, which devices and workers pin."""
        return self._identity.public_key

    def revoke_device(self, device_id: str) -> None:
        """Revoke a device: refused on the bus at once, and offline."""
        self.registry.revoke(device_id)
        with self._lock:
            self._presence.checked_out(device_id)
            self._async.checked_out(device_id, self._online)

    def devices(self, *, after: str | None = None, limit: int | None = None) -> list[DeviceRecord]:
        """Return the known devices by id (``limit`` after ``after``), last seen as of now."""
        return self._presence.with_last_seen(self._db.devices(after=after, limit=limit))

    def device_counts(self) -> dict[str, int]:
        """Return how many registered devices are online, offline and revoked."""
        total, revoked = self._db.count_devices(), self._db.count_revoked()
        with self._lock:
            online = len(self._online)
        return {"online": online, "offline": max(total - revoked - online, 0), "revoked": revoked}

    def online_devices(self) -> frozenset[str]:
        """Return the devices checked in and not gone (this coordinator's view since it started)."""
        with self._lock:
            return self._online.devices()

    def refusal_counts(self) -> dict[str, dict[str, int]]:
        """Return refused frames by component and reason (the coordinator's and each worker's)."""
        return {"coordinator": self.refusals.snapshot(), **self.worker_refusals}

    def _open_device_frame(self, delivery: Delivery) -> CheckIn | CheckOut | DeviceStage:
        """Verify a device's frame: signed by the device it names, on its own check-in topic."""
        message = self._devices.open_delivery(delivery)
        assert isinstance(message, CheckIn | CheckOut | SecAggKeys | SecAggShares | SecAggReveal)
        if message.device_id != message.sender:
            raise refuse(Refusal.SPOOFED, f"{message.sender} speaks for {message.device_id[:130]}")
        if isinstance(message, CheckIn):
            # Wall time, not the injected clock: devices sign with theirs, and an
            # emulated run's clock starts at zero.
            check_fresh(message, time.time(), self.CHECK_IN_MAX_AGE_S, 120.0)
            if len(message.platform) > self.MAX_PLATFORM_CHARS:
                raise refuse(Refusal.MALFORMED, "platform longer than 32 characters")
        return message

    def _on_checkin(self, delivery: Delivery) -> None:
        message = self.refusals.admit(delivery, self._open_device_frame)
        if message is None:
            return
        if isinstance(message, SecAggKeys | SecAggShares | SecAggReveal):
            with self._lock:  # kept in the database before the ack
                self._secure.received(message, bytes(delivery.body))
        elif isinstance(message, CheckIn):
            with self._lock:
                device, experiment = message.device_id, message.experiment_id or ANY
                # Devices check in after every update and with each heartbeat: only
                # news (a device coming online or restarted) costs a look for waiting
                # rounds and for a task it lost.
                capabilities = message.capabilities
                news = self._presence.checked_in(
                    device,
                    experiment,
                    capabilities.get(CheckIn.EXAMPLES),
                    capabilities.get(CheckIn.HEARTBEAT_S),
                    capabilities.get(CheckIn.STARTED_AT),
                )
                if self._presence.all_back(device):
                    log.info("every device seen before the restart is back")
                    self._start_waiting(None)
                self._async.checked_in(device, message.capabilities, experiment, self._online)
                if news:
                    self._presence.returned(device, experiment)
                    self._start_waiting(message.experiment_id)
        else:
            with self._lock:
                if self._presence.checked_out(message.device_id):
                    log.info("device %s went offline (%s)", message.device_id, message.reason[:80])
                self._async.checked_out(message.device_id, self._online)
        delivery.ack()

    def _task_again(self, device_id: str, experiment_id: str, back_at: float) -> None:
        """Send a device back online during its round the round's task again.

        Its process may have restarted (a device remembers the rounds it took in
        memory only), and over AMQP its queue went with the process, task and
        all; without the task again the round waits out its deadline for it. A
        device that still has the round's task ignores a second one. Sent
        ``Presence.RETURN_SETTLES_S`` after the return, and only for a round
        opened before it (the device's first check-in is a return too) that no
        worker has counted the device in by then. After this coordinator's own restart its
        recovery sent every task again already.
        """
        if self._presence.holding():
            return
        for opened in self._closing.awaiting(device_id, opened_by=back_at):
            exp = opened.experiment_id
            config = self._catalog.config(exp)
            if experiment_id not in (ANY, exp) or config.secure_aggregation is not None:
                continue  # a secure round's keys were shared without it: it cannot join now
            refs = self._tasks.refs(exp, opened.base_version)
            self._tasks.send(opened, config, refs, later=[], only=(device_id,))
            log.info("%s round %d: %s is back; its task sent again", exp, opened.round, device_id)

    def _grant_limit(self, device_id: str) -> tuple[str, int] | None:
        """Return a device's pinned key (base64) and example limit, None if it may not train."""
        key = self.registry.key(device_id)
        if key is None:
            return None
        declared = self._presence.declared(device_id) or self._max_examples
        return encode_key(key), min(declared, self._max_examples)

    def _start_waiting(self, experiment_id: str | None) -> None:
        """Start rounds that were waiting for enough devices to check in.

        Counted in memory: while too few devices are online, a device coming
        online costs no database read.
        """
        if self._presence.holding():
            return  # devices are still checking in after a restart
        for waiting_id, needed in list(self._waiting.items()):
            if experiment_id not in (None, waiting_id) or self._online.count(waiting_id) < needed:
                continue
            del self._waiting[waiting_id]
            try:
                exp = self._db.experiment(waiting_id)
            except NotFound:
                continue
            if exp.state != "waiting":
                continue
            if exp.current_round < exp.rounds_requested:
                self._start_round(exp.id)
            else:
                self._db.update_experiment(exp.id, state="idle")

    # -- rounds -------------------------------------------------------------------

    def _start_round(self, experiment_id: str) -> None:
        """Select the next round's cohort, record the round, and send its tasks."""
        exp = self._db.experiment(experiment_id)
        config = self._catalog.config(exp)
        pool = self._pool(experiment_id)
        if len(pool) < config.rounds.minimum or self._presence.holding():
            self._db.update_experiment(experiment_id, state="waiting")
            self._waiting[experiment_id] = config.rounds.minimum
            log.info(
                "%s waits for devices: %d online, %d needed",
                experiment_id,
                len(pool),
                config.rounds.minimum,
            )
            return
        if config.buffered:
            refs = self._tasks.refs(experiment_id, exp.model_version)
            self._async.open_step(exp, config, refs, self._online)
            return
        number = exp.current_round + 1
        # The seed and the round number fix the draw: the same devices online
        # give the same cohort in every run.
        rng = np.random.default_rng([config.seed, number])
        k = min(config.rounds.selection_size, len(pool))
        # Drawing indices draws what ``rng.choice(pool, ...)`` draws, without an array of ids.
        selected = tuple(pool[i] for i in rng.choice(len(pool), size=k, replace=False))
        now = self._clock()
        refs = self._tasks.refs(experiment_id, exp.model_version)
        opened = RoundOpened(
            experiment_id=experiment_id,
            round=number,
            base_version=exp.model_version,
            model=refs[WEIGHTS],
            selected=selected,
            target_reports=min(config.rounds.devices_per_round, k),
            min_reports=min(config.rounds.minimum, k),
            deadline_at=now + config.rounds.deadline_s,
            strategy=config.strategy,
            sender=self._identity.name,
        )
        self._db.add_round(new_round_record(opened, started_at=now))
        self._db.update_experiment(experiment_id, state="running", current_round=number)
        self._announce(opened)
        secure, caps = None, None
        if config.secure_aggregation is not None:  # before the tasks: devices answer with keys
            caps = self._example_caps(selected, config)
            secure = self._secure.begin(opened, config, caps)
        chosen = frozenset(selected)
        later = [d for d in pool if d not in chosen]
        self._tasks.send(opened, config, refs, later=later, secure=secure, caps=caps)
        log.info("%s round %d: selected %d of %d online", experiment_id, number, k, len(pool))

    def _pool(self, experiment_id: str) -> list[str]:
        """Return the online devices an experiment may select, sorted."""
        key = self.registry.key
        return [d for d in self._online.pool(experiment_id) if key(d) is not None]

    def _announce(self, opened: RoundOpened) -> None:
        """Tell the workers a round is open; ``tick`` drives it from there to its outcome."""
        self._track(opened)

    def _track(self, opened: RoundOpened) -> None:
        buffered = self._catalog.config(opened.experiment_id).buffered
        self._closing.track(opened, asynchronous=buffered)

    def _sign_and_publish(self, topic: str, message: Message) -> None:
        self._transport.publish(topic, encode(message, self._identity))

    def _resend_tasks(self, opened: RoundOpened) -> None:
        """Send a recovered round's tasks again (an asynchronous step refills at check-ins)."""
        refs = self._tasks.refs(opened.experiment_id, opened.base_version)
        config = self._catalog.config(opened.experiment_id)
        if config.buffered:
            self._async.resume(opened, config, refs)
            return
        key = (opened.experiment_id, opened.round)
        secure, caps = self._secure.settings(*key), self._secure.caps(*key)
        self._tasks.send(opened, config, refs, later=[], secure=secure, caps=caps)

    def _example_caps(self, selected: Sequence[str], config: ExperimentConfig) -> dict[str, int]:
        """Return the most examples each device may weight a secure update by."""
        assert config.secure_aggregation is not None
        cap = config.secure_aggregation.max_examples
        limits = {d: self._grant_limit(d) for d in selected}
        return {d: min(limit[1], cap) for d, limit in limits.items() if limit is not None}

    def tick(self) -> None:
        """Close rounds past their deadline and repeat what workers may have missed.

        Call periodically; see ``RoundClosing`` for the phases and their repeats.
        """
        with self._lock:
            if self._presence.grace_over():
                self._start_waiting(None)
            for device_id, experiment_id, back_at in self._presence.due_returns():
                self._task_again(device_id, experiment_id, back_at)
            for device_id in self._presence.silent():
                log.info(
                    "device %s went offline (no check-in for %d of its heartbeats)",
                    device_id,
                    Presence.SILENT_BEATS,
                )
                self._async.checked_out(device_id, self._online)
            self._async.expire(self._clock(), self._online)
            self._closing.tick()
            self._secure.tick()
        if self._presence.write_due():  # outside the lock: check-ins go on while it writes
            self._presence.write()

    def clock(self) -> float:
        """Return the coordinator's time (what deadlines and ``workers_heard`` are in)."""
        return self._clock()

    def database_reachable(self) -> bool:
        """Return whether the database answers now."""
        try:
            self._db.ping()
        except DatabaseError:
            return False
        return True

    def workers_heard(self) -> dict[str, float]:
        """Return when each worker last said anything (its beat, progress or an outcome)."""
        with self._lock:
            return dict(self._heard)

    def _on_worker_alive(self, delivery: Delivery) -> None:
        message = self.refusals.admit(delivery, self._alive.open_delivery)
        if message is None:
            return  # refused, counted and acked
        with self._lock:
            self._heard[message.sender] = self._clock()
        delivery.ack()

    def _on_event(self, delivery: Delivery) -> None:
        message = self.refusals.admit(delivery, self._workers.open_delivery)
        if message is None:
            return
        with self._lock:
            self._heard[message.sender] = self._clock()
        assert isinstance(
            message, RoundCommitted | RoundAbandoned | RoundProgress | PartialReady | RoundMasked
        )
        with self._lock:
            if isinstance(message, RoundMasked):
                if self._current_round(message.experiment_id, message.round) is not None:
                    self._closing.masked(message.experiment_id, message.round)
                    self._secure.masked(message)
            elif isinstance(message, RoundProgress):
                self._closing.progress(message)
            elif isinstance(message, PartialReady):
                self._closing.ready(message)
            else:
                self.worker_refusals[message.sender] = dict(message.refused)
            if isinstance(message, RoundCommitted):
                self._committed(message)
            elif isinstance(message, RoundAbandoned):
                self._abandoned(message)
        delivery.ack()

    def _round_in_flight(self, experiment_id: str) -> RoundRecord | None:
        """Return the experiment's round still training, if any (only its last one can be)."""
        last = self._db.last_round(experiment_id)
        return last if last is not None and last.state == "training" else None

    def _current_round(self, experiment_id: str, number: int) -> RoundRecord | None:
        """Return the round if it is still training (events may be redelivered)."""
        rnd = self._db.round_record(experiment_id, number)
        return rnd if rnd is not None and rnd.state == "training" else None

    def _committed(self, event: RoundCommitted) -> None:
        rnd = self._current_round(event.experiment_id, event.round)
        if rnd is None:
            return
        if event.version != rnd.base_version + 1:
            log.warning(
                "%s round %d: outcome names version %d",
                rnd.experiment_id,
                rnd.number,
                event.version,
            )
            return
        try:
            manifest = self._store.get_manifest(event.experiment_id, event.version)
        except Exception:  # the store's own errors: a version that is not there
            log.warning(
                "%s v%d: committed but not in the store", event.experiment_id, event.version
            )
            return
        if manifest.artifacts[WEIGHTS].sha256 != event.model.sha256:
            log.warning(
                "%s v%d: outcome's model is not the stored one", event.experiment_id, event.version
            )
            return
        metrics = {
            **event.metrics,
            **self._evaluations.scores(event.experiment_id, event.version, event.model.sha256),
        }
        self._db.update_round(
            event.experiment_id,
            event.round,
            state="committed",
            version=event.version,
            reported=event.reported,
            accepted=event.accepted,
            accepted_devices=event.accepted_devices,
            rejected=dict(event.rejected),
            dropped=self._dropped(rnd, event.reported),
            metrics=metrics,
            ended_at=self._clock(),
        )
        self._db.devices_served(event.accepted_devices)
        self._db.update_experiment(event.experiment_id, model_version=event.version)
        self._round_ended(event.experiment_id, event.round)

    def _abandoned(self, event: RoundAbandoned) -> None:
        rnd = self._current_round(event.experiment_id, event.round)
        if rnd is None:
            return
        self._db.update_round(
            event.experiment_id,
            event.round,
            state="abandoned",
            reason=event.reason,
            reported=event.reported,
            rejected=dict(event.rejected),
            dropped=self._dropped(rnd, event.reported),
            ended_at=self._clock(),
        )
        self._round_ended(event.experiment_id, event.round)

    def _abandon_secure(self, experiment_id: str, number: int, reason: str) -> None:
        """End a secure round its protocol cannot complete (too few devices at some stage)."""
        rnd = self._current_round(experiment_id, number)
        if rnd is not None and not self._withdraw(rnd, reason):
            log.warning("%s round %d is being combined: not abandoned", experiment_id, number)

    def _withdraw(self, rnd: RoundRecord, reason: str) -> bool:
        """Abandon a round the workers have not been asked to combine; False if they have."""
        experiment_id, number = rnd.experiment_id, rnd.number
        status = self._closing.status(experiment_id, number)
        if not self._closing.withdraw(experiment_id, number):
            return False
        reported = 0 if status is None else status.reported
        self._db.update_round(
            experiment_id,
            number,
            state="abandoned",
            reason=reason,
            reported=reported,
            dropped=self._dropped(rnd, reported),
            ended_at=self._clock(),
        )
        log.info("%s round %d abandoned: %s", experiment_id, number, reason)
        self._round_ended(experiment_id, number)
        return True

    def _dropped(self, rnd: RoundRecord, reported: int) -> int:
        """Return how many of a round's tasks never reported (async steps count their own)."""
        dropped = self._async.step_ended(rnd.experiment_id, rnd.number)
        return max(len(rnd.selected) - reported, 0) if dropped is None else dropped

    def _round_ended(self, experiment_id: str, number: int) -> None:
        """Tell listeners, then start the next requested round or go idle."""
        self._closing.ended(experiment_id, number)
        self._secure.ended(experiment_id, number)
        record = self._db.round_record(experiment_id, number)
        assert record is not None
        for listener in self._listeners:
            listener(record)
        exp = self._db.experiment(experiment_id)
        if exp.current_round < exp.rounds_requested:
            self._start_round(experiment_id)
        else:
            self._db.update_experiment(experiment_id, state="idle")
