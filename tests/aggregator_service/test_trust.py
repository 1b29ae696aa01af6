"""Trust on the bus: forged, unsigned and re-addressed frames never touch a model or a round.

Each case hands a receiver one frame that breaks one trust rule, checks that
it changed nothing (no model version, no outcome, no online device) and that
the refusal was counted with its reason, then sends the genuine frames that
complete the round, so a check that stopped working would show as a round
that commits the forged contribution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator_service import AggregatorWorker, Database, RoundService
from aggregator_service.versions import write_version
from broker import (
    CheckIn,
    CloseRound,
    Delivery,
    MemoryTransport,
    Message,
    ModelRef,
    ModelUpdate,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    StrategySpec,
    decode,
    decode_weights,
    encode,
    encode_weights,
)
from broker.identity import SERVICE_NAME, Identity
from broker.messages import TaskGrant
from broker.verify import Refusal, issue_grant
from model_store import LocalStore, MemoryStore
from tests.aggregator_service.round_driver import RoundDriver
from tests.clocks import Clock
from tests.identities import (
    SERVICE,
    TOPICS,
    WORKER,
    aggregator,
    device,
    grant,
    round_service,
    sign,
    with_grant,
)

EXP = "exp-trust"
OTHER_EXP = "exp-other"
SHAPE = (3,)

# -- the worker --------------------------------------------------------------------------


@dataclass
class Bench:
    transport: MemoryTransport
    store: MemoryStore
    worker: AggregatorWorker
    base_ref: ModelRef
    events: list[Message]
    notices: list[Message]
    driver: RoundDriver

    def refusals(self) -> dict[str, int]:
        return self.worker.refusals.snapshot()

    def assert_untouched(self) -> None:
        """Nothing came of what was sent so far: no outcome, no notice, no new version."""
        self.transport.join(timeout=10)
        assert self.events == []
        assert self.notices == []
        assert self.store.latest_version(EXP) == 0


@pytest.fixture
def bench() -> Iterator[Bench]:
    transport = MemoryTransport()
    store = MemoryStore()
    data = encode_weights({"w": np.zeros(SHAPE, np.float32)})
    manifest = store.publish(
        EXP, 0, {"weights.safetensors": (data, "application/vnd.fedmq.safetensors")}, parent=None
    )
    sha = manifest.artifacts["weights.safetensors"].sha256
    notices: list[Message] = []

    def record(into: list[Message]) -> Callable[[Delivery], None]:
        def handler(delivery: Delivery) -> None:
            into.append(decode(delivery.body))
            delivery.ack()

        return handler

    driver = RoundDriver(transport)
    transport.subscribe(f"{TOPICS.namespace}/device/+", record(notices))
    worker = aggregator(transport, store)
    worker.start()
    ref = ModelRef(store.blob_url(sha), sha, len(data))
    yield Bench(transport, store, worker, ref, driver.outcomes, notices, driver)  # type: ignore[arg-type]
    transport.close()


def _opened(bench: Bench, *, target: int = 2, strategy: StrategySpec | None = None) -> RoundOpened:
    return RoundOpened(
        experiment_id=EXP,
        round=1,
        base_version=0,
        model=bench.base_ref,
        selected=("a", "b", "c"),
        target_reports=target,
        min_reports=1,
        deadline_at=0.0,
        strategy=strategy or StrategySpec("fedavg"),
    )


def _open(bench: Bench, **kwargs: Any) -> None:
    bench.driver.open(_opened(bench, **kwargs))


def _update(device_id: str, value: float, n: int = 10, **fields: Any) -> ModelUpdate:
    return ModelUpdate(
        experiment_id=EXP,
        round=1,
        device_id=device_id,
        base_version=0,
        task_id=f"task-{device_id}",
        num_examples=n,
        inline_weights=encode_weights({"w": np.full(SHAPE, value, np.float32)}),
        **fields,
    )


def _named(name: str, *, key_of: str) -> Identity:
    """Return an identity calling itself ``name`` but holding ``key_of``'s key."""
    return Identity.from_private_bytes(name, device(key_of).private_bytes())


def _send(bench: Bench, device_id: str, value: float, n: int = 10) -> None:
    """Publish a genuine update: the device's own, with its grant, on its own topic."""
    bench.transport.publish(TOPICS.updates(EXP, device_id), sign(_update(device_id, value, n)))


def _commit_without_the_forgery(bench: Bench, refused: Refusal) -> None:
    """Complete the round with genuine updates from b and c; only they are in the model."""
    _send(bench, "b", 2.0)
    bench.transport.join(timeout=10)
    assert bench.events == []  # the forged update did not count towards the target of 2
    _send(bench, "c", 4.0)
    bench.transport.join(timeout=10)

    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted)
    assert committed.accepted_devices == ("b", "c") and committed.rejected == {}
    assert committed.refused == {refused.value: 1}  # the worker reports what it refused
    new = decode_weights(bench.store.get_blob(committed.model.sha256))
    np.testing.assert_allclose(new["w"], np.full(SHAPE, 3.0))
    assert bench.notices == []  # nothing is ever sent back to a forger


def test_an_unsigned_update_is_refused(bench: Bench) -> None:
    _open(bench)
    forged = with_grant(_update("a", 100.0))  # the right grant, but no signature

    bench.transport.publish(TOPICS.updates(EXP, "a"), encode(forged))

    bench.assert_untouched()
    assert bench.refusals() == {Refusal.UNSIGNED.value: 1}
    _commit_without_the_forgery(bench, Refusal.UNSIGNED)


@pytest.mark.parametrize(
    ("signer", "reason"),
    [
        # b signs a's update (with a's grant) as itself
        (lambda: device("b"), Refusal.SPOOFED),
        # a frame that names a as its sender, signed with b's key
        (
            lambda: Identity.from_private_bytes("a", device("b").private_bytes()),
            Refusal.BAD_SIGNATURE,
        ),
    ],
    ids=["as-itself", "in-a's-name"],
)
def test_an_update_signed_by_another_devices_key_is_refused(
    bench: Bench, signer: Callable[[], Identity], reason: Refusal
) -> None:
    _open(bench)

    bench.transport.publish(TOPICS.updates(EXP, "a"), sign(_update("a", 100.0), signer()))

    bench.assert_untouched()
    assert bench.refusals() == {reason.value: 1}
    _commit_without_the_forgery(bench, reason)


def _grant_signed_by(signer: Identity, update: ModelUpdate, max_examples: int = 10**9) -> str:
    """Return a grant of ``update``'s task, as ``signer`` would issue it."""
    issued = TaskGrant(
        experiment_id=update.experiment_id,
        round=update.round,
        device_id=update.device_id,
        task_id=update.task_id,
        public_key=device(update.device_id).public_key_text,
        max_examples=max_examples,
    )
    return issue_grant(issued, signer)


def test_an_update_whose_grant_the_service_did_not_sign_is_refused(bench: Bench) -> None:
    _open(bench)
    impostor = Identity.generate(SERVICE_NAME)  # the service's name, not its key
    update = _update("a", 100.0)
    forged = dataclasses.replace(update, grant=_grant_signed_by(impostor, update))

    bench.transport.publish(TOPICS.updates(EXP, "a"), sign(forged))

    bench.assert_untouched()
    assert bench.refusals() == {Refusal.BAD_GRANT.value: 1}
    _commit_without_the_forgery(bench, Refusal.BAD_GRANT)


@pytest.mark.parametrize(
    "changed",
    [{"task_id": "task-other"}, {"round": 2}, {"experiment_id": OTHER_EXP}],
    ids=["task", "round", "experiment"],
)
def test_a_valid_update_replayed_under_another_task_is_refused(
    bench: Bench, changed: dict[str, Any]
) -> None:
    _open(bench)
    valid = with_grant(_update("a", 100.0))  # a's genuine grant for task-a, round 1, EXP
    replayed = dataclasses.replace(valid, **changed)  # re-signed by a itself, same grant
    topic = TOPICS.updates(replayed.experiment_id, "a")

    bench.transport.publish(topic, sign(replayed))

    bench.assert_untouched()
    assert bench.refusals() == {Refusal.SPOOFED.value: 1}
    _commit_without_the_forgery(bench, Refusal.SPOOFED)


def test_an_update_on_another_devices_topic_is_refused(bench: Bench) -> None:
    _open(bench)

    bench.transport.publish(TOPICS.updates(EXP, "b"), sign(_update("a", 100.0)))

    bench.assert_untouched()
    assert bench.refusals() == {Refusal.SPOOFED.value: 1}
    _commit_without_the_forgery(bench, Refusal.SPOOFED)


def test_an_update_on_another_experiments_topic_is_refused(bench: Bench) -> None:
    _open(bench)

    bench.transport.publish(TOPICS.updates(OTHER_EXP, "a"), sign(_update("a", 100.0)))

    bench.assert_untouched()
    assert bench.refusals() == {Refusal.SPOOFED.value: 1}
    _commit_without_the_forgery(bench, Refusal.SPOOFED)


def test_more_examples_than_the_grant_allows_are_refused(bench: Bench) -> None:
    _open(bench)
    allowed = grant(EXP, 1, "a", "task-a", max_examples=10)
    greedy = dataclasses.replace(_update("a", 100.0, n=11), grant=allowed)

    bench.transport.publish(TOPICS.updates(EXP, "a"), sign(greedy))

    bench.assert_untouched()
    assert bench.refusals() == {Refusal.NOT_PERMITTED.value: 1}
    # The limit itself is allowed: a's honest update under the same grant counts.
    honest = dataclasses.replace(_update("a", 1.0, n=10), grant=allowed)
    bench.transport.publish(TOPICS.updates(EXP, "a"), sign(honest))
    _send(bench, "b", 4.0, n=30)
    bench.transport.join(timeout=10)
    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted) and committed.accepted_devices == ("a", "b")
    new = decode_weights(bench.store.get_blob(committed.model.sha256))
    np.testing.assert_allclose(new["w"], np.full(SHAPE, 3.25))  # (10 * 1 + 30 * 4) / 40


CONTROL_FORGERS = [
    pytest.param(lambda: Identity.generate(SERVICE_NAME), Refusal.BAD_SIGNATURE, id="impostor"),
    pytest.param(lambda: device("a"), Refusal.UNKNOWN_SENDER, id="device"),
    pytest.param(lambda: WORKER, Refusal.UNKNOWN_SENDER, id="worker"),
    pytest.param(lambda: None, Refusal.UNSIGNED, id="unsigned"),
]


def _frame(message: Message, signer: Identity | None) -> bytes:
    return encode(message) if signer is None else encode(message, signer)


@pytest.mark.parametrize(("forger", "reason"), CONTROL_FORGERS)
def test_a_round_opened_by_anyone_but_the_service_is_ignored(
    bench: Bench, forger: Callable[[], Identity | None], reason: Refusal
) -> None:
    forged = _frame(_opened(bench, target=2), forger())

    bench.transport.publish(TOPICS.control(EXP), forged)
    _send(bench, "a", 1.0)
    _send(bench, "b", 3.0)  # would meet the target, had the round been opened

    bench.assert_untouched()
    assert bench.refusals() == {reason.value: 1}
    _open(bench, target=2)  # the service's own announcement: the held updates fold
    bench.transport.join(timeout=10)
    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted) and committed.accepted_devices == ("a", "b")


@pytest.mark.parametrize(("forger", "reason"), CONTROL_FORGERS)
def test_a_close_sent_by_anyone_but_the_service_is_ignored(
    bench: Bench, forger: Callable[[], Identity | None], reason: Refusal
) -> None:
    _open(bench, target=3)
    _send(bench, "a", 1.0)

    forged = _frame(CloseRound(experiment_id=EXP, round=1), forger())
    bench.transport.publish(TOPICS.control(EXP), forged)

    bench.assert_untouched()
    assert bench.refusals() == {reason.value: 1}
    bench.driver.deadline()  # the service's own close
    bench.transport.join(timeout=10)
    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted) and committed.accepted_devices == ("a",)


def test_a_non_finite_aggregate_is_never_written_and_the_round_is_abandoned(
    bench: Bench,
) -> None:
    # Every update is finite and near float32's largest value; the server step
    # x - 2 * (x - mean) = 6e38 is not: it overflows to inf when cast to float32.
    _open(bench, target=2, strategy=StrategySpec("fedavgm", {"server_lr": 2.0, "momentum": 0.0}))
    _send(bench, "a", 3e38)
    _send(bench, "b", 3e38)
    bench.transport.join(timeout=10)

    (abandoned,) = bench.events
    assert isinstance(abandoned, RoundAbandoned)
    assert abandoned.reason is not None and "not finite" in abandoned.reason
    assert abandoned.accepted == 2
    assert bench.store.latest_version(EXP) == 0  # no version 1, of any content
    assert bench.notices == []  # the updates themselves were valid


def test_a_round_after_a_non_finite_aggregate_starts_from_a_clean_strategy_state(
    bench: Bench,
) -> None:
    strategy = StrategySpec("fedavgm", {"server_lr": 2.0, "momentum": 0.5})
    _open(bench, target=2, strategy=strategy)
    _send(bench, "a", 3e38)
    _send(bench, "b", 3e38)
    bench.transport.join(timeout=10)
    assert [type(e) for e in bench.events] == [RoundAbandoned]

    # The coordinator runs round 2 on the same base version, v0, with sane updates.
    second = dataclasses.replace(_opened(bench, target=2, strategy=strategy), round=2)
    bench.driver.open(second)
    for device_id in ("a", "b"):
        update = dataclasses.replace(_update(device_id, 1.0), round=2)
        bench.transport.publish(TOPICS.updates(EXP, device_id), sign(update))
    bench.transport.join(timeout=10)

    committed = bench.events[-1]
    assert isinstance(committed, RoundCommitted)
    new = decode_weights(bench.store.get_blob(committed.model.sha256))
    # A fresh velocity: v = 0 - 1 = -1, x = 0 - 2 * v = 2 (the abandoned round left no trace).
    np.testing.assert_allclose(new["w"], np.full(SHAPE, 2.0))


# -- the coordinator ---------------------------------------------------------------------


@dataclass
class Coordinator:
    transport: MemoryTransport
    store: LocalStore
    db: Database
    service: RoundService
    experiment_id: str

    def register(self, device_id: str) -> None:
        key = device(device_id).public_key_text
        self.service.register_device("python", public_key=key, device_id=device_id)

    def check_in(self, device_id: str, signer: Identity | None = None) -> None:
        message = CheckIn(device_id=device_id, platform="python")
        self.transport.publish(TOPICS.checkin(device_id), sign(message, signer))
        self.transport.join(timeout=10)

    def refusals(self) -> dict[str, int]:
        return self.service.refusals.snapshot()

    def state(self) -> str:
        return self.service.experiment(self.experiment_id).state


@pytest.fixture
def coordinator(tmp_path: Path, small_config: Any) -> Iterator[Coordinator]:
    transport, db = MemoryTransport(), Database("sqlite://")
    store = LocalStore(tmp_path / "store")
    service = round_service(transport, store, db, clock=Clock())
    service.start()
    # 4 devices per round, 3 needed to start one
    experiment_id = service.create_experiment(small_config())
    yield Coordinator(transport, store, db, service, experiment_id)
    transport.close()
    db.close()


def _waiting_for_a_third(coordinator: Coordinator) -> None:
    """Two genuine devices online; the requested round waits for a third."""
    for device_id in ("d0", "d1"):
        coordinator.register(device_id)
        coordinator.check_in(device_id)
    coordinator.service.request_rounds(coordinator.experiment_id, 1)
    assert coordinator.state() == "waiting"


def _still_waiting(coordinator: Coordinator, reason: Refusal) -> None:
    assert coordinator.state() == "waiting"
    assert coordinator.service.rounds(coordinator.experiment_id) == []
    assert coordinator.refusals() == {reason.value: 1}
    # A genuine third device is all the round was missing.
    coordinator.register("d9")
    coordinator.check_in("d9")
    assert coordinator.state() == "running"
    (first,) = coordinator.service.rounds(coordinator.experiment_id)
    assert sorted(first.selected) == ["d0", "d1", "d9"]


def test_a_check_in_from_an_unregistered_device_is_refused(coordinator: Coordinator) -> None:
    _waiting_for_a_third(coordinator)

    coordinator.check_in("stranger")

    _still_waiting(coordinator, Refusal.UNKNOWN_SENDER)
    assert "stranger" not in {d.id for d in coordinator.service.devices()}


def test_a_check_in_signed_by_the_wrong_key_is_refused(coordinator: Coordinator) -> None:
    _waiting_for_a_third(coordinator)
    coordinator.register("d2")

    coordinator.check_in("d2", signer=Identity.generate("d2"))

    _still_waiting(coordinator, Refusal.BAD_SIGNATURE)


def test_a_check_in_from_a_revoked_device_is_refused(coordinator: Coordinator) -> None:
    _waiting_for_a_third(coordinator)
    coordinator.register("d2")
    coordinator.service.revoke_device("d2")

    coordinator.check_in("d2")  # its own key, correctly signed: revoked all the same

    _still_waiting(coordinator, Refusal.UNKNOWN_SENDER)


def test_a_device_revoked_while_online_leaves_the_pool(coordinator: Coordinator) -> None:
    coordinator.register("d0")
    coordinator.check_in("d0")
    coordinator.register("d1")
    coordinator.check_in("d1")
    coordinator.register("d2")
    coordinator.check_in("d2")
    coordinator.service.revoke_device("d2")

    coordinator.service.request_rounds(coordinator.experiment_id, 1)

    assert coordinator.state() == "waiting"  # d2 no longer counts towards the three needed
    coordinator.check_in("d2")
    assert coordinator.state() == "waiting" and coordinator.refusals() == {"unknown_sender": 1}


def _training_round(coordinator: Coordinator) -> RoundCommitted:
    """Start round 1 and return a well-formed commit of it (a real version 1 in the store)."""
    for device_id in ("d0", "d1", "d2", "d3"):
        coordinator.register(device_id)
        coordinator.check_in(device_id)
    coordinator.service.request_rounds(coordinator.experiment_id, 1)
    (rnd,) = coordinator.service.rounds(coordinator.experiment_id)
    assert rnd.state == "training"
    store, exp = coordinator.store, coordinator.experiment_id
    manifest = store.get_manifest(exp, 0)
    base = decode_weights(store.get_blob(manifest.artifacts["weights.safetensors"].sha256))
    ref = write_version(store, exp, 0, 1, {k: np.asarray(v) + 1 for k, v in base.items()}, {})
    return RoundCommitted(
        experiment_id=exp,
        round=1,
        version=1,
        model=ref,
        reported=3,
        accepted=("u0", "u1", "u2"),
        accepted_devices=tuple(sorted(rnd.selected)[:3]),
    )


OUTCOME_FORGERS = [
    pytest.param(lambda: Identity.generate(WORKER.name), Refusal.BAD_SIGNATURE, id="impostor"),
    pytest.param(lambda: device("d0"), Refusal.UNKNOWN_SENDER, id="device"),
    pytest.param(lambda: SERVICE, Refusal.UNKNOWN_SENDER, id="service"),
]


@pytest.mark.parametrize(("forger", "reason"), OUTCOME_FORGERS)
def test_an_outcome_signed_by_anyone_but_a_worker_is_ignored(
    coordinator: Coordinator, forger: Callable[[], Identity], reason: Refusal
) -> None:
    commit = _training_round(coordinator)
    events = TOPICS.events(coordinator.experiment_id)

    coordinator.transport.publish(events, encode(commit, forger()))
    coordinator.transport.join(timeout=10)

    (rnd,) = coordinator.service.rounds(coordinator.experiment_id)
    assert rnd.state == "training" and rnd.version is None
    assert coordinator.service.experiment(coordinator.experiment_id).model_version == 0
    assert coordinator.refusals() == {reason.value: 1}
    assert coordinator.service.refusal_counts() == {"coordinator": {reason.value: 1}}
    # The same outcome from the worker commits the round.
    coordinator.transport.publish(events, sign(commit))
    coordinator.transport.join(timeout=10)
    (rnd,) = coordinator.service.rounds(coordinator.experiment_id)
    assert (rnd.state, rnd.version) == ("committed", 1)
