"""A coordinator restarted at any stage of a secure round rebuilds it from the database.

The coordinator (``SecureRounds``) runs against a real database and store;
real device participants answer it. At each stage the first coordinator is
dropped mid-way, with whatever it sent last lost, and a second one recovers
the round from the database: the round still unmasks to the exact sum. The
end-to-end fault test kills the real service process during the masking.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator_service.persistence import Database
from aggregator_service.secagg.coordinator import SecureRounds
from aggregator_service.secagg.strategy import MaskedSum, SecureSum, Unmasking
from aggregator_service.strategies import FedAvg
from broker import Message, ModelRef, RoundOpened, TrainTask, decode
from broker.secagg.messages import (
    RoundMasked,
    SecAggDelivery,
    SecAggNeighbours,
    SecAggReveal,
    SecAggShares,
    SecAggUnmask,
)
from device_sdk.secagg import SecureParticipant
from model_store import LocalStore
from tests.conftest import _small_config
from tests.identities import TOPICS, device

DEVICES = [f"dev-{i}" for i in range(5)]
CAP = 50
BASE = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
CONFIG = _small_config(secure_aggregation={"stage_timeout_s": 5.0})
OPENED = RoundOpened(
    experiment_id="exp",
    round=1,
    base_version=0,
    model=ModelRef("file:///v0", "0" * 64, 1),
    selected=tuple(DEVICES),
    target_reports=5,
    min_reports=3,
    deadline_at=1e12,
)


class Round:
    """Devices and a coordinator for one secure round, with a restart in between."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = Database(f"sqlite:///{tmp_path / 'fedmq.db'}")
        self.store = LocalStore(tmp_path / "store")
        self.outbox: deque[tuple[str, Message]] = deque()
        self.inbox: deque[bytes] = deque()
        self.combined: list[ModelRef] = []
        self.abandoned: list[str] = []
        self.updates: dict[str, tuple[dict[str, np.ndarray], int]] = {}
        self.deltas: dict[str, dict[str, np.ndarray]] = {}
        self.coordinator = self._coordinator()
        settings = self.coordinator.begin(OPENED, CONFIG, dict.fromkeys(DEVICES, CAP))
        self.tasks = {
            d: TrainTask(
                experiment_id="exp",
                round=1,
                base_version=0,
                model=OPENED.model,
                secure_aggregation=settings,
            )
            for d in DEVICES
        }
        self.devices = {d: self._device(d) for d in DEVICES}

    def _coordinator(self) -> SecureRounds:
        return SecureRounds(
            self.db,
            self.store,
            publish=lambda topic, message: self.outbox.append((topic, message)),
            topics=TOPICS,
            combine=lambda _exp, _n, ref: self.combined.append(ref),
            abandon=lambda _exp, _n, reason: self.abandoned.append(reason),
            narrow=lambda *_args: None,
        )

    def _device(self, device_id: str) -> SecureParticipant:
        def send_update(_task: Any, weights: dict[str, np.ndarray], n: int, _m: Any) -> None:
            self.updates[device_id] = (weights, n)

        return SecureParticipant(
            device(device_id), lambda _topic, frame: self.inbox.append(frame), TOPICS, send_update
        )

    def restart(self) -> None:
        """Drop the coordinator and what it had not delivered; recover a new one."""
        self.outbox.clear()
        self.coordinator = self._coordinator()
        self.coordinator.recover(OPENED, CONFIG)

    def send_tasks(self) -> None:
        for d in DEVICES:
            self.devices[d].task(self.tasks[d])

    def pump(self, *, limit: int | None = None) -> None:
        """Deliver device frames to the coordinator and its messages to the devices."""
        delivered = 0
        while (self.inbox or self.outbox) and (limit is None or delivered < limit):
            if self.inbox:
                frame = self.inbox.popleft()
                self.coordinator.received(decode(frame), frame)  # type: ignore[arg-type]
                delivered += 1
                continue
            topic, message = self.outbox.popleft()
            target = next(d for d in DEVICES if TOPICS.device(d) == topic)
            self._deliver(target, message)

    def _deliver(self, target: str, message: Message) -> None:
        participant = self.devices[target]
        if isinstance(message, SecAggNeighbours):
            participant.neighbours(message)
        elif isinstance(message, SecAggDelivery):
            participant.delivery(message)
            rng = np.random.default_rng(int(target[-1]))
            delta = {k: rng.normal(0, 0.1, v.shape).astype(np.float32) for k, v in BASE.items()}
            self.deltas[target] = delta
            participant.trained(self.tasks[target], BASE, delta, CAP - 3, {})
        elif isinstance(message, SecAggUnmask):
            participant.unmask(message)

    def seal(self) -> MaskedSum:
        """Sum the masked updates as the workers do and tell the coordinator who is in it."""
        total = MaskedSum(BASE)
        for weights, n in self.updates.values():
            total.add(weights, n)
        masked = RoundMasked(
            experiment_id="exp", round=1, devices=tuple(sorted(self.updates)), reported=5
        )
        self.coordinator.masked(masked)
        return total

    def unmasked_sum(self, total: MaskedSum) -> dict[str, np.ndarray]:
        assert self.combined, self.abandoned
        unmasking = Unmasking.from_json(self.store.get_blob(self.combined[-1].sha256))
        secure = SecureSum(FedAvg(), clip=1.0, max_examples=10_000)
        return dict(secure.unmask(BASE, total, unmasking).sums)


def _assert_exact(rnd: Round, sums: dict[str, np.ndarray]) -> None:
    scale = rnd.tasks[DEVICES[0]].secure_aggregation.scale  # type: ignore[union-attr]
    assert set(rnd.updates) == set(DEVICES)
    for k in BASE:
        want = sum((CAP - 3) * rnd.deltas[d][k].astype(np.float64) for d in DEVICES)
        assert np.abs(sums[k] - want).max() <= len(DEVICES) * 0.5 / scale


@pytest.mark.parametrize("stage", ["keys", "shares", "masking", "unmasking", "unmasked"])
def test_a_restarted_coordinator_finishes_the_round_it_was_running(
    tmp_path: Path, stage: str
) -> None:
    rnd = Round(tmp_path)
    rnd.send_tasks()
    if stage == "keys":
        rnd.pump(limit=2)  # two devices' keys in, then the crash
        rnd.restart()
        rnd.send_tasks()  # the service sends a recovered round's tasks again
    elif stage == "shares":
        rnd.pump(limit=5)  # every key in; the neighbourhoods sent are lost in the crash
        rnd.restart()
    rnd.pump()
    if stage == "masking":  # the shares were delivered; the sum is not sealed yet
        assert len(rnd.updates) == 5
        rnd.restart()
        rnd.pump()
    total = rnd.seal()
    if stage == "unmasking":
        rnd.pump(limit=2)  # two reveals in
        rnd.restart()
    rnd.pump()
    if stage == "unmasked":
        assert len(rnd.combined) == 1
        rnd.restart()  # the combine request the coordinator sent may be lost
        assert len(rnd.combined) == 2
    assert not rnd.abandoned
    # The caps the scale was sized for survive the restart: re-sent tasks grant no more.
    assert rnd.coordinator.caps("exp", 1) == dict.fromkeys(DEVICES, CAP)
    assert rnd.coordinator.settings("exp", 1) == rnd.tasks[DEVICES[0]].secure_aggregation
    _assert_exact(rnd, rnd.unmasked_sum(total))


def test_a_round_whose_state_was_never_saved_is_abandoned(tmp_path: Path) -> None:
    rnd = Round(tmp_path)
    rnd.db.forget_secagg_round("exp", 1)
    rnd.restart()
    assert rnd.abandoned == ["secure aggregation state lost: the round's state was never saved"]


def test_only_stage_messages_of_a_tracked_round_are_kept(tmp_path: Path) -> None:
    rnd = Round(tmp_path)
    rnd.send_tasks()
    rnd.pump()
    shares = [
        SecAggShares(experiment_id="exp", round=2, device_id="dev-0", shares={}),
        SecAggReveal(experiment_id="exp", round=1, device_id="dev-0"),
    ]
    for message in shares:  # another round's, and a reveal before any was asked for
        rnd.coordinator.received(message, b"")
    assert b"" not in rnd.db.secagg_frames("exp", 1)  # the early reveal was not kept
    assert len(rnd.db.secagg_frames("exp", 1)) == 2 * len(DEVICES)  # keys and shares
    assert not rnd.db.secagg_frames("exp", 2)
