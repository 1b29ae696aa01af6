"""Checkpointed acks: a worker acks folded updates once a checkpoint holds them; after a
crash the round still counts every update exactly once, whether the worker restarts
under its name (it resumes its share) or another worker takes over (the dead one's
share is combined as it was saved)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from aggregator_service import AggregatorWorker
from broker import (
    CloseRound,
    CombineRound,
    ModelRef,
    ModelUpdate,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    RoundProgress,
    StrategySpec,
    decode,
    decode_weights,
    encode_weights,
)
from broker.identity import Identity
from model_store import MemoryStore
from tests.aggregator_service.worker_doubles import Bus, FakeDelivery
from tests.identities import TOPICS, WORKER, aggregator, sign

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
        strategy=StrategySpec("fedavg"),
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


def _start(store: MemoryStore, identity: Identity = WORKER) -> tuple[AggregatorWorker, Bus]:
    bus = Bus()
    worker = aggregator(bus, store, identity=identity, checkpoint_every=2)  # type: ignore[arg-type]
    worker.start()
    return worker, bus


def _combine(bus: Bus, opened: RoundOpened) -> RoundCommitted:
    """Ask the worker on ``bus`` to combine the round; return the outcome it published."""
    request = CombineRound(
        experiment_id=EXP,
        round=opened.round,
        base_version=opened.base_version,
        model=opened.model,
        min_reports=opened.min_reports,
        strategy=opened.strategy,
    )
    bus.deliver(TOPICS.combine(EXP), request, TOPICS.all_combine)
    outcomes = [
        m
        for m in (decode(body) for topic, body in bus.published if topic == TOPICS.events(EXP))
        if isinstance(m, RoundCommitted)
    ]
    (committed,) = outcomes
    return committed


def _published(bus: Bus, kind: type) -> list:  # type: ignore[type-arg]
    messages = (decode(body) for topic, body in bus.published if topic == TOPICS.events(EXP))
    return [m for m in messages if isinstance(m, kind)]


def test_folded_updates_are_acked_once_a_checkpoint_holds_them() -> None:
    store, opened = _setup()
    _, bus = _start(store)
    bus.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)

    first = bus.deliver(TOPICS.updates(EXP, "a"), _update("a", 1.0), TOPICS.all_updates)
    assert first.settled == []  # held: its contribution is only in memory
    second = bus.deliver(TOPICS.updates(EXP, "b"), _update("b", 2.0), TOPICS.all_updates)

    assert first.settled == ["ack"] and second.settled == ["ack"]
    assert store.latest_version(f"{EXP}.r1.{WORKER.name}.ckpt") == 0
    # Who reported goes to the coordinator in one batch, off the handler's path.
    deadline = time.monotonic() + 5
    while not _published(bus, RoundProgress) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [p.reported for p in _published(bus, RoundProgress)] == [("a", "b")]


def test_a_restarted_worker_resumes_its_share_and_counts_each_update_and_device_once() -> None:
    store, opened = _setup()
    _, dying = _start(store)
    dying.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)
    a, b, c = _update("a", 1.0), _update("b", 2.0), _update("c", 4.0)
    for update in (a, b, c):
        dying.deliver(TOPICS.updates(EXP, update.device_id), update, TOPICS.all_updates)
    # the worker dies here: a and b are checkpointed and acked, c was never acked

    _, restarted = _start(store)  # the same name: it resumes its own chain
    # The redelivered update reaches the worker before the round's re-announcement.
    replayed_c = restarted.deliver(TOPICS.updates(EXP, "c"), c, TOPICS.all_updates)
    assert replayed_c.settled == []  # held until the worker learns of the round
    restarted.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)
    copy_of_a = restarted.deliver(TOPICS.updates(EXP, "a"), a, TOPICS.all_updates)
    fresh_from_a = restarted.deliver(
        TOPICS.updates(EXP, "a"), _update("a", 100.0), TOPICS.all_updates
    )
    restarted.deliver(TOPICS.updates(EXP, "d"), _update("d", 8.0), TOPICS.all_updates)
    committed = _combine(restarted, opened)

    assert len(committed.accepted) == 4 and set(committed.accepted) >= {
        a.message_id,
        b.message_id,
        c.message_id,
    }
    # A copy of a counted update is acked silently; a fresh one from its device is a duplicate.
    assert copy_of_a.settled == ["ack"] and fresh_from_a.settled == ["ack"]
    assert committed.rejected == {"duplicate": 1}
    new = decode_weights(store.get_blob(committed.model.sha256))
    np.testing.assert_allclose(new["w"], np.full(3, (1 + 2 + 4 + 8) / 4))
    assert replayed_c.settled == ["ack"]


def test_another_worker_takes_over_and_the_dead_workers_share_is_combined_once() -> None:
    store, opened = _setup()
    _, dying = _start(store, Identity.generate("dies"))
    dying.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)
    a, b, c = _update("a", 1.0), _update("b", 2.0), _update("c", 4.0)
    for update in (a, b, c):
        dying.deliver(TOPICS.updates(EXP, update.device_id), update, TOPICS.all_updates)
    # "dies" is killed between saving a and b and the acks reaching the broker,
    # so a and b come back redelivered too, with c that it never saved.

    _, survivor = _start(store)
    survivor.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)
    copies = [
        survivor.deliver_frame(
            TOPICS.updates(EXP, u.device_id), sign(u), TOPICS.all_updates, redelivered=True
        )
        for u in (a, b, c)
    ]
    survivor.deliver(TOPICS.updates(EXP, "d"), _update("d", 8.0), TOPICS.all_updates)
    committed = _combine(survivor, opened)

    assert len(committed.accepted) == 4 and len(set(committed.accepted)) == 4
    assert sorted(committed.accepted_devices) == ["a", "b", "c", "d"]
    new = decode_weights(store.get_blob(committed.model.sha256))
    np.testing.assert_allclose(new["w"], np.full(3, (1 + 2 + 4 + 8) / 4))
    assert [d.settled for d in copies] == [["ack"], ["ack"], ["ack"]]


def test_an_update_two_workers_both_folded_abandons_the_round_rather_than_count_twice() -> None:
    store, opened = _setup()
    _, first = _start(store, Identity.generate("first"))
    _, second = _start(store)
    a = _update("a", 1.0)
    for bus in (first, second):
        bus.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)
        # A publisher's resend after a reconnect: two broker messages, one update id.
        bus.deliver(TOPICS.updates(EXP, "a"), a, TOPICS.all_updates)
        bus.deliver(TOPICS.control(EXP), CloseRound(experiment_id=EXP, round=1), TOPICS.all_control)
    request = CombineRound(
        experiment_id=EXP,
        round=1,
        base_version=0,
        model=opened.model,
        min_reports=1,
        strategy=opened.strategy,
    )

    second.deliver(TOPICS.combine(EXP), request, TOPICS.all_combine)

    (abandoned,) = _published(second, RoundAbandoned)
    assert abandoned.reason is not None and "counted by two workers" in abandoned.reason
    assert store.latest_version(EXP) == 0


def _redeliver(bus: Bus, update: ModelUpdate) -> FakeDelivery:
    return bus.deliver_frame(
        TOPICS.updates(EXP, update.device_id), sign(update), TOPICS.all_updates, redelivered=True
    )


def test_a_copy_of_an_update_folded_here_is_acked_only_with_the_checkpoint_that_holds_it() -> None:
    store, opened = _setup()
    _, bus = _start(store)
    bus.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)
    a = _update("a", 1.0)
    first = bus.deliver(TOPICS.updates(EXP, "a"), a, TOPICS.all_updates)

    copy = _redeliver(bus, a)  # the broker's copy, after a reconnect
    assert copy.settled == []  # acking it now would lose a if the worker died before saving
    bus.deliver(TOPICS.updates(EXP, "b"), _update("b", 2.0), TOPICS.all_updates)
    assert first.settled == copy.settled == ["ack"]

    # Once a checkpoint holds it, a copy is acked at once.
    assert _redeliver(bus, a).settled == ["ack"]


@pytest.mark.parametrize("first_saves_it", [True, False], ids=["saved-by-first", "lost-by-first"])
def test_an_update_redelivered_while_its_first_worker_was_cut_off_is_counted_once(
    first_saves_it: bool,
) -> None:
    store, opened = _setup()
    _, cut_off = _start(store, Identity.generate("cut-off"))
    _, other = _start(store)
    for bus in (cut_off, other):
        bus.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)
    a, b = _update("a", 1.0), _update("b", 2.0)
    cut_off.deliver(TOPICS.updates(EXP, "a"), a, TOPICS.all_updates)  # folded, not yet saved
    # cut-off's connection drops unnoticed: the broker hands a to the other worker.
    copy = _redeliver(other, a)
    if first_saves_it:
        # cut-off saves its share with a in it, still unaware its delivery went back.
        cut_off.deliver(TOPICS.updates(EXP, "b"), b, TOPICS.all_updates)
    else:
        other.deliver(TOPICS.updates(EXP, "b"), b, TOPICS.all_updates)  # cut-off dies unsaved
    for device, value in (("c", 4.0), ("d", 8.0)):
        other.deliver(TOPICS.updates(EXP, device), _update(device, value), TOPICS.all_updates)
    if first_saves_it:
        close = CloseRound(experiment_id=EXP, round=1)
        cut_off.deliver(TOPICS.control(EXP), close, TOPICS.all_control)
    committed = _combine(other, opened)

    assert len(committed.accepted) == len(set(committed.accepted)) == 4, committed.accepted
    assert a.message_id in committed.accepted
    assert sorted(committed.accepted_devices) == ["a", "b", "c", "d"]
    assert committed.num_examples == 4
    new = decode_weights(store.get_blob(committed.model.sha256))
    np.testing.assert_allclose(new["w"], np.full(3, (1 + 2 + 4 + 8) / 4))
    assert copy.settled == ["ack"]


def test_a_worker_that_leaves_saves_its_share_and_hands_back_what_it_did_not_count() -> None:
    store, opened = _setup()
    worker, bus = _start(store)
    bus.deliver(TOPICS.control(EXP), opened, TOPICS.all_control)
    folded = bus.deliver(TOPICS.updates(EXP, "a"), _update("a", 1.0), TOPICS.all_updates)
    later = dataclasses.replace(_update("c", 3.0), experiment_id="exp-later")
    early = bus.deliver(TOPICS.updates("exp-later", "c"), later, TOPICS.all_updates)
    assert folded.settled == [] and early.settled == []  # in memory only, both
    at_cancel: dict[str, list[str]] = {}
    bus.when_cancelled = lambda topic: at_cancel.setdefault(topic, list(folded.settled))

    worker.stop()

    # Acked before its subscription went: cancelling an AMQP consumer closes its channel,
    # and an ack after that is lost (the update would be requeued, though saved).
    assert at_cancel[TOPICS.all_updates] == ["ack"]
    assert folded.settled == ["ack"]  # saved in a share the combiner merges
    assert store.latest_version(f"{EXP}.r1.{WORKER.name}.ckpt") == 0
    assert [p.reported for p in _published(bus, RoundProgress)] == [("a",)]
    assert early.settled == ["requeue"]  # back to the group's other workers
    assert TOPICS.all_updates not in bus.handlers and TOPICS.all_combine not in bus.handlers
    assert TOPICS.all_control in bus.handlers  # round control is not shared: nothing to hand on
