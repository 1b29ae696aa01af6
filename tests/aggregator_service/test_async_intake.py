"""The worker's asynchronous (FedBuff) intake: staleness-weighted deltas, steps of K, dedupe."""

from __future__ import annotations

import math

import numpy as np

from broker import (
    Message,
    ModelRef,
    ModelUpdate,
    RejectReason,
    RoundCommitted,
    RoundOpened,
    UpdateRejected,
    decode,
    decode_weights,
    encode_weights,
)
from model_store import MemoryStore
from tests.aggregator_service.worker_doubles import Bus as SharedBus
from tests.aggregator_service.worker_doubles import FakeDelivery
from tests.identities import TOPICS, aggregator

EXP = "exp-async"
VERSIONS = [np.zeros(2, np.float32), np.full(2, 1.0, np.float32), np.full(2, 2.0, np.float32)]


class Bus(SharedBus):
    """The shared recording bus, with shortcuts for this experiment's topics."""

    def control(self, message: Message) -> None:
        self.deliver(TOPICS.control(EXP), message, TOPICS.all_control)

    def update(self, update: ModelUpdate) -> FakeDelivery:
        return self.deliver(TOPICS.updates(EXP, update.device_id), update, TOPICS.all_updates)

    def events(self) -> list[Message]:
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


def _opened(store: MemoryStore, number: int, base: int, **strategy: object) -> RoundOpened:
    artifact = store.get_manifest(EXP, base).artifacts["weights.safetensors"]
    settings = {"name": "fedbuff", "buffer_size": 2, "max_staleness": 3, **strategy}
    return RoundOpened(
        experiment_id=EXP,
        round=number,
        base_version=base,
        model=ModelRef(store.blob_url(artifact.sha256), artifact.sha256, artifact.size),
        selected=("a",),
        target_reports=int(settings["buffer_size"]),  # type: ignore[call-overload]
        min_reports=1,
        deadline_at=0.0,
        strategy=settings,
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
    bus.control(_opened(store, number=2, base=1, server_lr=1.0))

    fresh = bus.update(_update("a", 1.5, base=1, round_number=2))  # delta 0.5, tau 0
    late = bus.update(_update("b", 4.0, base=0))  # trained on v0: delta 4.0, tau 1

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
    bus.control(_opened(store, number=3, base=2, max_staleness=1))

    stale = bus.update(_update("old", 9.0, base=0))  # 2 versions behind, bound 1
    bus.update(_update("a", 3.0, base=2, round_number=3))
    bus.update(_update("b", 3.0, base=1, round_number=2))  # 1 behind: still fine

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
    bus.control(_opened(store, number=1, base=0))

    first = [bus.update(_update(d, 1.0, base=0)) for d in ("a", "b")]
    held = [bus.update(_update(d, 2.0, base=0)) for d in ("c", "d")]

    assert [type(e).__name__ for e in bus.events()] == ["RoundCommitted"]
    assert all(d.settled == ["ack"] for d in first)
    assert all(d.settled == [] for d in held)  # no step open: held, not refused
    assert bus.notices() == []

    bus.control(_opened(store, number=2, base=1))  # the coordinator announces step 2

    one, two = bus.events()
    assert isinstance(two, RoundCommitted) and (two.round, two.version) == (2, 2)
    # v1 = 0 + (1 + 1) / 2 = 1; v2 = v1 + (2 + 2) / sqrt(2) / 2 (trained on v0, tau 1)
    np.testing.assert_allclose(_model(store, one), np.full(2, 1.0))
    np.testing.assert_allclose(_model(store, two), np.full(2, 1.0 + 2.0 / math.sqrt(2.0)))
    assert all(d.settled == ["ack"] for d in held)


def test_redelivered_updates_are_counted_once_even_after_their_step_committed() -> None:
    store = _store(versions=1)
    bus = _worker(store)
    bus.control(_opened(store, number=1, base=0, buffer_size=3))
    a, b = _update("a", 1.0, base=0), _update("b", 2.0, base=0)

    bus.update(a)
    again = bus.update(a)  # redelivered before the commit
    bus.update(b)
    bus.update(_update("c", 3.0, base=0))
    bus.control(_opened(store, number=2, base=1, buffer_size=3))
    late_copy = bus.update(b)  # redelivered after its step committed

    assert again.settled == ["ack"] and late_copy.settled == ["ack"]
    assert bus.notices() == []
    (committed,) = bus.events()
    assert isinstance(committed, RoundCommitted) and len(committed.accepted) == 3
    np.testing.assert_allclose(_model(store, committed), np.full(2, 2.0))  # (1 + 2 + 3) / 3


def test_a_successor_republishes_a_step_committed_before_a_crash() -> None:
    store = _store(versions=1)
    dying = _worker(store)
    dying.control(_opened(store, number=1, base=0))
    a, b = _update("a", 1.0, base=0), _update("b", 3.0, base=0)
    dying.update(a)
    dying.update(b)
    (original,) = dying.events()
    # The coordinator never heard of it: it announces step 1 again, to a new worker.

    successor = _worker(store)
    successor.control(_opened(store, number=1, base=0))
    successor.control(_opened(store, number=2, base=1))
    replayed = successor.update(a)

    (repeated,) = successor.events()
    assert isinstance(original, RoundCommitted) and isinstance(repeated, RoundCommitted)
    assert (repeated.version, repeated.model.sha256) == (1, original.model.sha256)
    assert sorted(repeated.accepted) == sorted(original.accepted)
    assert replayed.settled == ["ack"] and successor.notices() == []
    assert store.latest_version(EXP) == 1
