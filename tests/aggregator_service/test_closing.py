"""The coordinator's round phases across workers: close when complete, combine when all are in."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator_service.checkpoints import Checkpoints, NameClash, RoundCheckpoint, Sealed
from aggregator_service.rounds.closing import RoundClosing
from aggregator_service.strategies import Partial
from broker import (
    CloseRound,
    CombineRound,
    Message,
    ModelRef,
    PartialReady,
    RoundOpened,
    RoundProgress,
    StrategySpec,
)
from broker.topics import Topics
from model_store import MemoryStore

TOPICS = Topics()
OPENED = RoundOpened(
    experiment_id="e",
    round=1,
    base_version=0,
    model=ModelRef("memory://", "ab" * 32, 1),
    selected=("a", "b", "c"),
    target_reports=2,
    min_reports=1,
    deadline_at=100.0,
    strategy=StrategySpec("fedavg"),
)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.now = 0.0
        self.roster: list[str] = []

    def publish(self, _topic: str, message: Message) -> None:
        self.sent.append(message)

    def kinds(self) -> list[str]:
        return [type(m).__name__ for m in self.sent]


def _closing(recorder: Recorder) -> RoundClosing:
    return RoundClosing(
        recorder.publish, TOPICS, lambda: recorder.now, roster=lambda _e, _r: recorder.roster
    )


def _progress(worker: str, *devices: str) -> RoundProgress:
    return RoundProgress(
        experiment_id="e", round=1, reported=devices, accepted=devices, sender=worker
    )


def _ready(worker: str) -> PartialReady:
    return PartialReady(experiment_id="e", round=1, sequence=0, sender=worker)


def test_the_round_closes_once_the_devices_accepted_across_workers_meet_the_target() -> None:
    recorder = Recorder()
    closing = _closing(recorder)
    closing.track(OPENED, asynchronous=False)

    closing.progress(_progress("w1", "a"))
    assert recorder.kinds() == ["RoundOpened"]
    closing.progress(_progress("w2", "b"))

    assert recorder.kinds() == ["RoundOpened", "CloseRound"]
    closing.ready(_ready("w1"))
    assert recorder.kinds()[-1] == "CloseRound"  # w2's share is not in yet
    closing.ready(_ready("w2"))
    assert recorder.kinds() == ["RoundOpened", "CloseRound", "CombineRound"]
    assert isinstance(recorder.sent[-1], CombineRound) and recorder.sent[-1].min_reports == 1


def test_a_worker_on_the_roster_is_waited_for_even_before_its_progress_arrives() -> None:
    recorder = Recorder()
    closing = _closing(recorder)
    closing.track(OPENED, asynchronous=False)
    closing.progress(_progress("w1", "a", "b"))
    recorder.roster = ["w1", "w2"]  # w2 joined and folded; its progress is still on the way

    closing.ready(_ready("w1"))

    assert recorder.kinds() == ["RoundOpened", "CloseRound"]
    closing.ready(_ready("w2"))
    assert recorder.kinds()[-1] == "CombineRound"


def test_a_silent_worker_is_combined_without_after_the_wait_and_combines_repeat_less_often() -> (
    None
):
    recorder = Recorder()
    closing = _closing(recorder)
    closing.track(OPENED, asynchronous=False)
    closing.progress(_progress("w1", "a"))
    closing.progress(_progress("dead", "b"))
    closing.ready(_ready("w1"))

    for second in range(int(RoundClosing.PARTIALS_WAIT_S)):
        recorder.now = second
        closing.ready(_ready("w1"))  # w1 answers every repeated close: no news
        closing.progress(_progress("w1", "a"))
        closing.tick()
    assert "CombineRound" not in recorder.kinds()
    recorder.now = RoundClosing.PARTIALS_WAIT_S
    closing.tick()
    assert recorder.kinds().count("CombineRound") == 1
    for step in range(1, 60):
        recorder.now = RoundClosing.PARTIALS_WAIT_S + step
        closing.tick()
    # Repeats after 5, 10, 20 s (then 40 s): not every 5 s.
    assert recorder.kinds().count("CombineRound") == 4


def test_the_deadline_closes_the_round_and_an_empty_one_is_combined_at_once() -> None:
    recorder = Recorder()
    closing = _closing(recorder)
    closing.track(OPENED, asynchronous=False)

    recorder.now = 100.0
    closing.tick()

    assert recorder.kinds() == ["RoundOpened", "CloseRound", "CombineRound"]
    assert isinstance(recorder.sent[1], CloseRound)


class SavedShares:
    """What the round's saved shares name, as ``Checkpoints.saved_devices`` reads it."""

    def __init__(self) -> None:
        self.reported: set[str] = set()
        self.accepted: set[str] = set()
        self.reads = 0
        self.failing = False

    def __call__(self, _experiment: str, _round: int) -> tuple[set[str], set[str]]:
        self.reads += 1
        if self.failing:
            raise OSError("the store is out")
        return set(self.reported), set(self.accepted)


def _closing_with(recorder: Recorder, saved: SavedShares) -> RoundClosing:
    return RoundClosing(
        recorder.publish,
        TOPICS,
        lambda: recorder.now,
        roster=lambda _e, _r: recorder.roster,
        saved=saved,
    )


def test_a_quiet_round_counts_the_devices_a_dead_workers_saved_share_names() -> None:
    # w1 reported "a"; "dead" saved "b" and died before reporting it.
    recorder, saved = Recorder(), SavedShares()
    saved.reported = saved.accepted = {"b", "stranger"}
    closing = _closing_with(recorder, saved)
    closing.track(OPENED, asynchronous=False)
    recorder.now = 1.0
    closing.progress(_progress("w1", "a"))

    recorder.now = 1.0 + RoundClosing.QUIET_S - 0.5
    closing.tick()
    assert saved.reads == 0 and "CloseRound" not in recorder.kinds()  # news came lately
    recorder.now = 1.0 + RoundClosing.QUIET_S
    closing.tick()

    assert saved.reads == 1
    # Closed long before the deadline (100 s), once the saved share was read.
    assert recorder.kinds().count("CloseRound") == 1 and recorder.kinds()[-1] == "CloseRound"
    assert closing.accepted("e", 1) == {"a", "b"}  # the cohort's only: not "stranger"


def test_saved_shares_are_read_once_per_quiet_spell_and_a_store_error_leaves_the_deadline() -> None:
    recorder, saved = Recorder(), SavedShares()
    saved.failing = True
    closing = _closing_with(recorder, saved)
    closing.track(OPENED, asynchronous=False)

    for tenth in range(1, 990):
        recorder.now = tenth / 10
        closing.tick()
    assert saved.reads == 4  # at 5, 15, 35 and 95 s of quiet: 10, 20, then 60 s apart
    assert "CloseRound" not in recorder.kinds()
    recorder.now = OPENED.deadline_at
    closing.tick()
    assert "CloseRound" in recorder.kinds()


def test_a_saved_share_counts_its_refused_devices_as_answered_not_accepted() -> None:
    recorder, saved = Recorder(), SavedShares()
    saved.reported = {"b"}  # "b"'s update was refused: it answered, it is not counted
    closing = _closing_with(recorder, saved)
    closing.track(OPENED, asynchronous=False)
    closing.progress(_progress("w1", "a"))

    recorder.now = RoundClosing.QUIET_S
    closing.tick()

    status = closing.status("e", 1)
    assert saved.reads == 1 and status is not None
    assert (status.reported, status.accepted) == (2, 1)
    assert "CloseRound" not in recorder.kinds()  # 1 of a target of 2; "c" still to answer


def test_the_saved_devices_are_every_roster_members_newest_share() -> None:
    checkpoints = Checkpoints(MemoryStore())
    for worker, sequence, devices in (("w1", 0, ["a"]), ("w1", 1, ["a", "b"]), ("w2", 0, ["c"])):
        checkpoints.join("e", 1, worker)
        share = _checkpoint(sequence, 1.0)
        share.accepted_devices = devices
        share.reporters = [*devices, "refused"]
        checkpoints.save("e", 1, share, worker)
    aside = _checkpoint(1, 1.0)
    aside.aside_devices = ["d"]
    checkpoints.save("e", 1, aside, "w2")  # w2's newest: "c" no longer, "d" set aside

    reported, counted = checkpoints.saved_devices("e", 1)

    assert counted == {"a", "b", "d"}
    assert reported == {"a", "b", "refused"}
    assert checkpoints.saved_devices("e", 2) == (set(), set())


def _checkpoint(sequence: int, value: float) -> RoundCheckpoint:
    return RoundCheckpoint(sequence, Partial({"w": np.full(2, value)}, {"count": 1.0}))


def test_a_second_process_under_one_worker_name_is_a_name_clash_not_a_seal() -> None:
    checkpoints = Checkpoints(MemoryStore())
    checkpoints.save("e", 1, _checkpoint(0, 1.0), "w")

    with pytest.raises(NameClash):
        checkpoints.save("e", 1, _checkpoint(0, 2.0), "w")
    checkpoints.join("e", 1, "w")
    assert checkpoints.seal("e", 1) == {"w": 0}
    with pytest.raises(Sealed):
        checkpoints.save("e", 1, _checkpoint(1, 3.0), "w")
    assert checkpoints.seal("e", 1) == {"w": 0}  # sealing again gives the same cut
