"""Buffered (FedBuff) steps through the worker's one pipeline: staleness, steps of K, dedupe.

The worker folds a step's updates into its share and closes it once the share
holds ``K`` (``PartialReady``); the coordinator then asks for the combine,
which these tests send themselves (``Bus.combine``).
"""

from __future__ import annotations

import math

import numpy as np

from broker import (
    CloseRound,
    CombineRound,
    Message,
    ModelRef,
    ModelUpdate,
    PartialReady,
    RejectReason,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    StrategySpec,
    UpdateRejected,
    decode,
    decode_weights,
    encode_weights,
)
from broker.identity import Identity
from broker.messages import Scalar
from model_store import MemoryStore
from tests.aggregator_service.worker_doubles import Bus as SharedBus
from tests.aggregator_service.worker_doubles import FakeDelivery
from tests.identities import TOPICS, aggregator, sign

EXP = "exp-async"
VERSIONS = [np.zeros(2, np.float32), np.full(2, 1.0, np.float32), np.full(2, 2.0, np.float32)]


class Bus(SharedBus):
    """The shared recording bus, with shortcuts for this experiment's topics."""

    def control(self, message: Message) -> None:
        self.deliver(TOPICS.control(EXP), message, TOPICS.all_control)

    def update(self, update: ModelUpdate, *, redelivered: bool = False) -> FakeDelivery:
        topic = TOPICS.updates(EXP, update.device_id)
        return self.deliver_frame(topic, sign(update), TOPICS.all_updates, redelivered=redelivered)

    def combine(self, opened: RoundOpened) -> None:
        """Ask for the step's combine, as the coordinator does once every partial is ready."""
        request = CombineRound(
            experiment_id=EXP,
            round=opened.round,
            base_version=opened.base_version,
            model=opened.model,
            min_reports=opened.min_reports,
            strategy=opened.strategy,
        )
        self.deliver(TOPICS.combine(EXP), request, TOPICS.all_combine)

    def ready(self) -> list[int]:
        """Return the steps this worker said its share of is durable."""
        return [m.round for m in self._events() if isinstance(m, PartialReady)]

    def events(self) -> list[Message]:
        """Return the outcomes published."""
        return [m for m in self._events() if isinstance(m, RoundCommitted | RoundAbandoned)]

    def _events(self) -> list[Message]:
        return [decode(body) for topic, body in self.published if topic == TOPICS.events(EXP)]

    def notices(self) -> list[UpdateRejected]:
        devices = f"{TOPICS.namespace}/device/"
        return [
            m
            for topic, body in self.published
            if topic.startswith(devices) and isinstance(m := decode(body), UpdateRejected)
        ]


def _store(versions: int) -> MemoryStore:
    """A store holding model versions 0..versions-1 of EXP (w = 0, 1, 2, ...)."""
    store = MemoryStore()
    for v in range(versions):
        data = encode_weights({"w": VERSIONS[v]})
        store.publish(
            EXP,
            v,
            {"weights.safetensors": (data, "application/vnd.fedmq.safetensors")},
            parent=v - 1 if v else None,
        )
    return store


def _opened(store: MemoryStore, number: int, base: int, **strategy: Scalar) -> RoundOpened:
    artifact = store.get_manifest(EXP, base).artifacts["weights.safetensors"]
    settings: dict[str, Scalar] = {"buffer_size": 2, "max_staleness": 3, **strategy}
    return RoundOpened(
        experiment_id=EXP,
        round=number,
        base_version=base,
        model=ModelRef(store.blob_url(artifact.sha256), artifact.sha256, artifact.size),
        selected=("a",),
        target_reports=int(settings["buffer_size"]),
        min_reports=1,
        deadline_at=0.0,
        strategy=StrategySpec("fedbuff", settings),
    )


def _update(device: str, value: float, base: int, *, round_number: int = 1) -> ModelUpdate:
    return ModelUpdate(
        experiment_id=EXP,
        round=round_number,
        device_id=device,
        base_version=base,
        task_id=f"task-{device}-{base}-{value}",
        num_examples=10,
        inline_weights=encode_weights({"w": np.full(2, value, np.float32)}),
    )


def _worker(store: MemoryStore) -> Bus:
    bus = Bus()
    aggregator(bus, store, checkpoint_every=100).start()  # type: ignore[arg-type]
    return bus


def _model(store: MemoryStore, event: Message) -> np.ndarray:
    assert isinstance(event, RoundCommitted)
    return decode_weights(store.get_blob(event.model.sha256))["w"]


def test_deltas_from_an_older_version_are_down_weighted_by_their_staleness() -> None:
    store = _store(versions=2)
    bus = _worker(store)
    opened = _opened(store, number=2, base=1, server_lr=1.0)
    bus.control(opened)

    fresh = bus.update(_update("a", 1.5, base=1, round_number=2))  # delta 0.5, tau 0
    late = bus.update(_update("b", 4.0, base=0))  # trained on v0: delta 4.0, tau 1
    assert bus.ready() == [2] and bus.events() == []  # K in the share: closed here
    bus.combine(opened)

    (committed,) = bus.events()
    assert isinstance(committed, RoundCommitted)
    assert (committed.round, committed.version) == (2, 2)
    # x1 + (1 * 0.5 + 4.0 / sqrt(2)) / K, K = 2
    expected = 1.0 + (0.5 + 4.0 / math.sqrt(2.0)) / 2
    np.testing.assert_allclose(_model(store, committed), np.full(2, expected), rtol=1e-6)
    assert committed.accepted_devices == ("a", "b") and committed.rejected == {}
    assert fresh.settled == ["ack"] and late.settled == ["ack"]
    assert store.latest_version(EXP) == 2


def test_an_update_beyond_the_staleness_bound_is_refused_as_stale() -> None:
    store = _store(versions=3)
    bus = _worker(store)
    opened = _opened(store, number=3, base=2, max_staleness=1)
    bus.control(opened)

    stale = bus.update(_update("old", 9.0, base=0))  # 2 versions behind, bound 1
    bus.update(_update("a", 3.0, base=2, round_number=3))
    bus.update(_update("b", 3.0, base=1, round_number=2))  # 1 behind: still fine
    bus.combine(opened)

    (notice,) = bus.notices()
    assert notice.reason == RejectReason.STALE and "2 versions behind" in notice.detail
    assert stale.settled == ["ack"]  # the verdict is final
    (committed,) = bus.events()
    assert isinstance(committed, RoundCommitted)
    assert committed.rejected == {"stale": 1} and committed.reported == 3
    assert committed.accepted_devices == ("a", "b")


def test_a_version_is_committed_every_k_updates_and_later_ones_wait_for_the_next_step() -> None:
    store = _store(versions=1)
    bus = _worker(store)
    step_one = _opened(store, number=1, base=0)
    bus.control(step_one)

    first = [bus.update(_update(d, 1.0, base=0)) for d in ("a", "b")]
    held = [bus.update(_update(d, 2.0, base=0)) for d in ("c", "d")]
    bus.combine(step_one)

    assert [type(e).__name__ for e in bus.events()] == ["RoundCommitted"]
    assert all(d.settled == ["ack"] for d in first)
    assert all(d.settled == [] for d in held)  # no step open: held, not refused
    assert bus.notices() == []

    step_two = _opened(store, number=2, base=1)
    bus.control(step_two)  # the coordinator announces step 2
    bus.combine(step_two)

    one, two = bus.events()
    assert isinstance(two, RoundCommitted) and (two.round, two.version) == (2, 2)
    # v1 = 0 + (1 + 1) / 2 = 1; v2 = v1 + (2 + 2) / sqrt(2) / 2 (trained on v0, tau 1)
    np.testing.assert_allclose(_model(store, one), np.full(2, 1.0))
    np.testing.assert_allclose(_model(store, two), np.full(2, 1.0 + 2.0 / math.sqrt(2.0)))
    assert all(d.settled == ["ack"] for d in held)


def test_redelivered_updates_are_counted_once_even_after_their_step_committed() -> None:
    store = _store(versions=1)
    bus = _worker(store)
    step_one = _opened(store, number=1, base=0, buffer_size=3)
    bus.control(step_one)
    a, b = _update("a", 1.0, base=0), _update("b", 2.0, base=0)

    bus.update(a)
    again = bus.update(a, redelivered=True)  # redelivered before the commit
    bus.update(b)
    bus.update(_update("c", 3.0, base=0))
    bus.combine(step_one)
    bus.control(_opened(store, number=2, base=1, buffer_size=3))
    late_copy = bus.update(b, redelivered=True)  # redelivered after its step committed

    assert again.settled == ["ack"] and late_copy.settled == ["ack"]
    assert bus.notices() == []
    (committed,) = bus.events()
    assert isinstance(committed, RoundCommitted) and len(committed.accepted) == 3
    np.testing.assert_allclose(_model(store, committed), np.full(2, 2.0))  # (1 + 2 + 3) / 3


def test_a_successor_republishes_a_step_committed_before_a_crash() -> None:
    store = _store(versions=1)
    dying = _worker(store)
    step_one = _opened(store, number=1, base=0)
    dying.control(step_one)
    a, b = _update("a", 1.0, base=0), _update("b", 3.0, base=0)
    dying.update(a)
    dying.update(b)
    dying.combine(step_one)
    (original,) = dying.events()
    # The coordinator never heard of it: it asks again, and a new worker answers.

    successor = _worker(store)
    successor.control(step_one)  # sealed: nothing more goes into it
    successor.combine(step_one)
    successor.control(_opened(store, number=2, base=1))
    replayed = successor.update(a, redelivered=True)  # its ack was lost in the crash

    (repeated,) = successor.events()
    assert isinstance(original, RoundCommitted) and isinstance(repeated, RoundCommitted)
    assert (repeated.version, repeated.model.sha256) == (1, original.model.sha256)
    assert sorted(repeated.accepted) == sorted(original.accepted)
    assert replayed.settled == ["ack"] and successor.notices() == []
    assert store.latest_version(EXP) == 1


def test_two_workers_fill_one_step_and_their_shares_combine_into_one_version() -> None:
    store = _store(versions=1)
    one, two = _worker(store), _worker_named(store, "worker-2")
    opened = _opened(store, number=1, base=0, buffer_size=4)
    one.control(opened)
    two.control(opened)

    for device, value in (("a", 1.0), ("b", 2.0)):
        one.update(_update(device, value, base=0))
    for device, value in (("c", 3.0), ("d", 6.0)):
        two.update(_update(device, value, base=0))
    # Neither share holds K = 4: the coordinator closes the step from their progress.
    assert one.ready() == [] and two.ready() == []
    one.control(CloseRound(experiment_id=EXP, round=1))
    two.control(CloseRound(experiment_id=EXP, round=1))
    two.combine(opened)

    (committed,) = two.events()
    assert isinstance(committed, RoundCommitted)
    assert sorted(committed.accepted_devices) == ["a", "b", "c", "d"]
    np.testing.assert_allclose(_model(store, committed), np.full(2, 3.0))  # (1+2+3+6) / 4


def test_a_step_two_shares_overfilled_steps_by_the_mean_of_what_it_holds() -> None:
    store = _store(versions=1)
    one, two = _worker(store), _worker_named(store, "worker-2")
    opened = _opened(store, number=1, base=0, buffer_size=2)
    one.control(opened)
    two.control(opened)

    # Both shares reach K before either hears that the step closed.
    for device, value in (("a", 1.0), ("b", 2.0)):
        one.update(_update(device, value, base=0))
    for device, value in (("c", 3.0), ("d", 6.0)):
        two.update(_update(device, value, base=0))
    one.combine(opened)

    (committed,) = one.events()
    assert isinstance(committed, RoundCommitted) and len(committed.accepted) == 4
    np.testing.assert_allclose(_model(store, committed), np.full(2, 3.0))  # mean, not sum / K


def _worker_named(store: MemoryStore, name: str) -> Bus:
    bus = Bus()
    aggregator(bus, store, identity=Identity.generate(name), checkpoint_every=100).start()  # type: ignore[arg-type]
    return bus


def test_an_update_set_aside_in_one_step_is_not_counted_again_in_the_next() -> None:
    store = _store(versions=1)
    cut_off, setter = _worker_named(store, "cut-off"), _worker_named(store, "setter")
    step_one = _opened(store, number=1, base=0)
    for bus in (cut_off, setter):
        bus.control(step_one)
    u = _update("u", 1.0, base=0)
    cut_off.update(u)  # folded, never saved: cut-off dies
    # Redelivered while cut-off is on the roster: setter sets it aside.
    setter.update(u, redelivered=True)
    setter.update(_update("b", 3.0, base=0))
    setter.combine(step_one)
    (one,) = setter.events()
    assert isinstance(one, RoundCommitted) and u.message_id in one.accepted

    # Setter's ack was lost too: a third worker gets u again, in the next step.
    third = _worker_named(store, "third")
    step_two = _opened(store, number=2, base=1)
    third.control(step_two)
    copy = third.update(u, redelivered=True)
    for device, value in (("c", 2.0), ("d", 4.0)):
        third.update(_update(device, value, base=1, round_number=2))
    third.combine(step_two)

    assert copy.settled == ["ack"] and third.notices() == []
    (two,) = third.events()
    assert isinstance(two, RoundCommitted) and u.message_id not in two.accepted
    assert len(two.accepted) == 2
    # v1 = (1 + 3) / 2 = 2; v2 = v1 + ((2 - v1) + (4 - v1)) / 2 = 3
    np.testing.assert_allclose(_model(store, two), np.full(2, 3.0))
