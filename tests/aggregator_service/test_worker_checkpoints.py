"""Checkpointed acks: a worker acks folded updates once a checkpoint holds them,
and a successor resumes from the checkpoint, counting every update exactly once."""

from __future__ import annotations

import numpy as np

from aggregator_service import AggregatorWorker
from broker import (
    ModelRef,
    ModelUpdate,
    RoundCommitted,
    RoundOpened,
    decode,
    decode_weights,
    encode_weights,
)
from model_store import MemoryStore
from tests.aggregator_service.worker_doubles import Bus
from tests.identities import TOPICS, aggregator

EXP = "exp-ckpt"
DEVICES = ("a", "b", "c", "d")


def _setup() -> tuple[MemoryStore, RoundOpened]:
    store = MemoryStore()
    base = encode_weights({"w": np.zeros(3, np.float32)})
    manifest = store.publish(EXP, 0, {"weights.safetensors": (base, "x")}, parent=None)
    sha = manifest.artifacts["weights.safetensors"].sha256
    opened = RoundOpened(
        experiment_id=EXP,
        round=1,
        base_version=0,
        model=ModelRef("memory://", sha, len(base)),
        selected=DEVICES,
        target_reports=4,
        min_reports=4,
        deadline_at=0.0,
        strategy={"name": "fedavg"},
    )
    return store, opened


def _update(device: str, value: float, message_id: str | None = None) -> ModelUpdate:
    extra = {"message_id": message_id} if message_id else {}
    return ModelUpdate(
        experiment_id=EXP,
        round=1,
        device_id=device,
        base_version=0,
        task_id="t",
        num_examples=1,
        inline_weights=encode_weights({"w": np.full(3, value, np.float32)}),
        **extra,
    )


def _start(store: MemoryStore) -> tuple[AggregatorWorker, Bus]:
    bus = Bus()
    worker = aggregator(bus, store, checkpoint_every=2)  # type: ignore[arg-type]
    worker.start()
    return worker, bus


def test_folded_updates_are_acked_once_a_checkpoint_holds_them() -> None:
    store, opened = _setup()
    _, bus = _start(store)
    bus.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)

    first = bus.deliver(TOPICS.updates(EXP, "a"), _update("a", 1.0), TOPICS.all_updates)
    assert first.settled == []  # held: its contribution is only in memory
    second = bus.deliver(TOPICS.updates(EXP, "b"), _update("b", 2.0), TOPICS.all_updates)

    assert first.settled == ["ack"] and second.settled == ["ack"]
    assert store.latest_version(f"{EXP}.r1.ckpt") == 0


def test_a_successor_resumes_the_checkpoint_and_counts_each_update_once() -> None:
    store, opened = _setup()
    _, dying = _start(store)
    dying.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)
    a, b, c = _update("a", 1.0), _update("b", 2.0), _update("c", 4.0)
    for update in (a, b, c):
        dying.deliver(TOPICS.updates(EXP, update.device_id), update, TOPICS.all_updates)
    # the worker dies here: a and b are checkpointed and acked, c was never acked

    _, successor = _start(store)
    # The redelivered update reaches the new worker before the round's re-announcement.
    replayed_c = successor.deliver(TOPICS.updates(EXP, "c"), c, TOPICS.all_updates)
    assert replayed_c.settled == []  # held until the worker learns of the round
    successor.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)
    duplicate_a = successor.deliver(TOPICS.updates(EXP, "a"), a, TOPICS.all_updates)
    successor.deliver(TOPICS.updates(EXP, "d"), _update("d", 8.0), TOPICS.all_updates)

    events = [decode(body) for topic, body in successor.published if topic == TOPICS.events(EXP)]
    (committed,) = events
    assert isinstance(committed, RoundCommitted)
    assert sorted(committed.accepted) == sorted(
        [a.message_id, b.message_id, c.message_id, committed.accepted[-1]]
    )
    # The copy of a, already counted before the crash, is acked silently, not rejected.
    assert len(set(committed.accepted)) == 4 and committed.rejected == {}
    new = decode_weights(store.get_blob(committed.model.sha256))
    np.testing.assert_allclose(new["w"], np.full(3, (1 + 2 + 4 + 8) / 4))
    assert replayed_c.settled == ["ack"] and duplicate_a.settled == ["ack"]
