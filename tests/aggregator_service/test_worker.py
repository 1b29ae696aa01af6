"""The worker's validation: bad updates are rejected with a reason and never touch the model."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from broker import (
    Delivery,
    ErrorReply,
    MemoryTransport,
    Message,
    ModelRef,
    ModelUpdate,
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
from model_store import MemoryStore
from tests.aggregator_service.round_driver import RoundDriver
from tests.identities import TOPICS, aggregator, grant, sign

EXP = "exp1"
BASE = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


@dataclass
class Bench:
    transport: MemoryTransport
    store: MemoryStore
    base_ref: ModelRef
    events: list[Message]
    notices: list[UpdateRejected]
    driver: RoundDriver


@pytest.fixture
def bench() -> Iterator[Bench]:
    transport = MemoryTransport()
    store = MemoryStore()
    data = encode_weights(BASE)
    store.publish(
        EXP, 0, {"weights.safetensors": (data, "application/vnd.fedmq.safetensors")}, parent=None
    )
    manifest = store.get_manifest(EXP, 0)
    sha = manifest.artifacts["weights.safetensors"].sha256
    notices: list[UpdateRejected] = []

    def record(into: list) -> object:  # type: ignore[type-arg]
        def handler(delivery: Delivery) -> None:
            into.append(decode(delivery.body))
            delivery.ack()

        return handler

    driver = RoundDriver(transport)
    transport.subscribe(f"{TOPICS.namespace}/device/+", record(notices))  # type: ignore[arg-type]
    aggregator(transport, store).start()
    ref = ModelRef(store.blob_url(sha), sha, len(data))
    yield Bench(transport, store, ref, driver.outcomes, notices, driver)  # type: ignore[arg-type]
    transport.close()


def _open(
    bench: Bench, *, target: int = 2, minimum: int = 1, selected: tuple[str, ...] = ("a", "b", "c")
) -> None:
    opened = RoundOpened(
        experiment_id=EXP,
        round=1,
        base_version=0,
        model=bench.base_ref,
        selected=selected,
        target_reports=target,
        min_reports=minimum,
        deadline_at=0.0,
        strategy=StrategySpec("fedavg"),
    )
    bench.driver.open(opened)


def _send(
    bench: Bench,
    device: str,
    weights: dict[str, np.ndarray],
    n: int = 10,
    *,
    base_version: int = 0,
    round_number: int = 1,
    metrics: dict[str, float] | None = None,
) -> ModelUpdate:
    update = ModelUpdate(
        experiment_id=EXP,
        round=round_number,
        device_id=device,
        base_version=base_version,
        task_id="t",
        num_examples=n,
        inline_weights=encode_weights(weights),
        metrics=metrics or {},
    )
    bench.transport.publish(TOPICS.updates(EXP, device), sign(update))
    return update


def _good(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((3, 2), value, np.float32), "b": np.full(2, value, np.float32)}


def _nan() -> dict[str, np.ndarray]:
    weights = _good(1.0)
    weights["w"][1, 1] = np.nan
    return weights


def _inf() -> dict[str, np.ndarray]:
    weights = _good(1.0)
    weights["b"][0] = -np.inf
    return weights


BAD_UPDATES = [
    ({"w": np.ones((3, 2), np.float32)}, RejectReason.NAMES_MISMATCH),
    ({**_good(1.0), "extra": np.ones(1, np.float32)}, RejectReason.NAMES_MISMATCH),
    ({"w": np.ones((2, 3), np.float32), "b": np.ones(2, np.float32)}, RejectReason.SHAPE_MISMATCH),
    ({"w": np.ones((3, 2), np.float64), "b": np.ones(2, np.float32)}, RejectReason.DTYPE_MISMATCH),
    (_nan(), RejectReason.NON_FINITE),
    (_inf(), RejectReason.NON_FINITE),
]


@pytest.mark.parametrize(
    ("weights", "reason"), BAD_UPDATES, ids=["missing", "extra", "shape", "dtype", "nan", "inf"]
)
def test_a_bad_update_is_rejected_with_its_reason_and_leaves_the_model_untouched(
    bench: Bench, weights: dict[str, np.ndarray], reason: RejectReason
) -> None:
    _open(bench, target=2)
    _send(bench, "a", _good(2.0), n=10)
    bad = _send(bench, "b", weights, n=1000)
    _send(bench, "c", _good(4.0), n=30)
    bench.transport.join(timeout=10)

    assert [(n.update_id, n.reason) for n in bench.notices] == [(bad.message_id, reason)]
    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted)
    assert committed.accepted_devices == ("a", "c")
    assert committed.rejected == {reason.value: 1}
    new = decode_weights(bench.store.get_blob(committed.model.sha256))
    np.testing.assert_allclose(new["w"], np.full((3, 2), 3.5))  # (10*2 + 30*4) / 40


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"device": "zz"}, RejectReason.NOT_SELECTED),
        ({"base_version": 7}, RejectReason.STALE),
        ({"n": 0}, RejectReason.BAD_EXAMPLE_COUNT),
        ({"round_number": 5}, RejectReason.UNKNOWN_ROUND),
    ],
)
def test_protocol_violations_are_rejected_with_their_reason(
    bench: Bench, kwargs: dict[str, object], reason: RejectReason
) -> None:
    _open(bench, target=2)
    device = str(kwargs.pop("device", "a"))

    _send(bench, device, _good(1.0), **kwargs)  # type: ignore[arg-type]
    bench.transport.join(timeout=10)

    assert [n.reason for n in bench.notices] == [reason]
    assert bench.events == []


def test_a_second_update_from_the_same_device_is_a_duplicate(bench: Bench) -> None:
    _open(bench, target=2)
    _send(bench, "a", _good(1.0))
    _send(bench, "a", _good(9.0))
    _send(bench, "b", _good(3.0))
    bench.transport.join(timeout=10)

    assert [n.reason for n in bench.notices] == [RejectReason.DUPLICATE]
    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted)
    new = decode_weights(bench.store.get_blob(committed.model.sha256))
    np.testing.assert_allclose(new["b"], [2.0, 2.0])


def test_updates_after_commit_are_late(bench: Bench) -> None:
    _open(bench, target=1)
    _send(bench, "a", _good(1.0))
    _send(bench, "b", _good(2.0))
    bench.transport.join(timeout=10)

    assert [n.reason for n in bench.notices] == [RejectReason.ROUND_CLOSED]


def test_closing_below_the_minimum_abandons_the_round_and_writes_no_version(bench: Bench) -> None:
    _open(bench, target=3, minimum=2)
    _send(bench, "a", _good(1.0))
    bench.driver.deadline()
    bench.transport.join(timeout=10)

    (abandoned,) = bench.events
    assert isinstance(abandoned, RoundAbandoned)
    assert abandoned.accepted == 1
    assert bench.store.latest_version(EXP) == 0


def test_closing_at_the_minimum_commits_what_arrived(bench: Bench) -> None:
    _open(bench, target=3, minimum=2)
    _send(bench, "a", _good(1.0))
    _send(bench, "b", _good(3.0))
    bench.driver.deadline()
    bench.transport.join(timeout=10)

    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted)
    assert committed.version == 1
    assert bench.store.latest_version(EXP) == 1


def test_an_update_that_overtakes_its_round_announcement_is_held_then_folded(
    bench: Bench,
) -> None:
    _send(bench, "a", _good(1.0))  # round 1 is not open yet
    bench.transport.join(timeout=10)
    assert bench.notices == [] and bench.events == []

    _open(bench, target=1)
    bench.transport.join(timeout=10)

    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted)
    assert committed.accepted_devices == ("a",)


def _refuse(bench: Bench, device_id: str, code: str) -> None:
    task_id = f"task-of-{device_id}"
    reply = ErrorReply(
        in_reply_to=task_id,
        code=code,
        grant=grant(EXP, 1, device_id, task_id),
        sender=device_id,
    )
    bench.transport.publish(TOPICS.updates(EXP, device_id), sign(reply))


def test_a_device_refusing_its_task_is_counted_once_under_a_known_code(bench: Bench) -> None:
    # A compromised device once flooded its round with replies under invented codes:
    # each became a reason of its own, until the outcome outgrew the header limit.
    _open(bench, target=3, minimum=1)
    _refuse(bench, "a", "training_failed")
    for i in range(50):
        _refuse(bench, "a", f"made_up_{i}")
    _refuse(bench, "b", "made_up")
    _send(bench, "c", _good(1.0))
    bench.transport.join(timeout=10)
    bench.driver.deadline()  # one accepted of a target of three: it closes at its deadline
    bench.transport.join(timeout=10)

    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted)
    assert committed.accepted_devices == ("c",)
    assert committed.rejected == {"device_training_failed": 1, "device_other": 1}


def test_a_refusal_code_of_another_shape_is_refused_as_malformed(bench: Bench) -> None:
    _open(bench, target=2, minimum=1)
    _refuse(bench, "a", "x" * 100_000)
    _refuse(bench, "b", "Not A Code")
    _send(bench, "c", _good(1.0))
    bench.transport.join(timeout=10)
    bench.driver.deadline()
    bench.transport.join(timeout=10)

    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted)
    assert committed.rejected == {} and committed.reported == 1


def test_a_loss_that_overflows_the_share_is_refused_and_the_round_commits(bench: Bench) -> None:
    # 1.7e308 x 1000 examples is inf: the share's loss sum could not be checkpointed,
    # and every update of the share was lost with it.
    _open(bench, target=3, minimum=2)
    _send(bench, "a", _good(1.0), n=1000, metrics={"loss": 1.7e308})
    _send(bench, "b", _good(2.0), n=10)
    _send(bench, "c", _good(4.0), n=30)
    bench.transport.join(timeout=10)

    assert [n.reason for n in bench.notices] == [RejectReason.NON_FINITE]
    (committed,) = bench.events
    assert isinstance(committed, RoundCommitted)
    assert committed.accepted_devices == ("b", "c")
    assert committed.rejected == {RejectReason.NON_FINITE.value: 1}
