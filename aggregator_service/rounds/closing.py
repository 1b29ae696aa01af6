"""When a round closes and when it is combined: the coordinator's view across workers.

Several workers share a round's updates, so none of them knows whether the
round is complete; the coordinator does, from their ``RoundProgress``. A
cohort round moves through three phases, each message repeated every
``REPEAT_S`` until the next phase (a worker may have missed it, or the
coordinator may have restarted):

- training: ``RoundOpened``, until the accepted devices meet the target,
  every selected device has answered, or the deadline passes (after
  ``QUIET_S`` without news the workers' saved shares are read too: a worker
  that died may have saved devices it never reported);
- closing: ``CloseRound``, until every worker on the round's roster (each
  joins it before its first fold) or that reported has answered
  ``PartialReady``, or no worker has said anything for ``PARTIALS_WAIT_S``
  (a worker that died says nothing; its last checkpoint is combined as it
  stands);
- combining: ``CombineRound`` to one worker, until the outcome arrives,
  repeated at growing intervals (a combine may take a while).

An asynchronous (FedBuff) step goes through the same phases. It has no
cohort: its devices are whoever had a task, and it is complete once the
workers' shares hold ``target_reports`` (the buffer size ``K``) updates
between them, each worker reporting how many its share holds.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from broker import (
    CloseRound,
    CombineRound,
    Message,
    ModelRef,
    PartialReady,
    RoundOpened,
    RoundProgress,
)
from broker.topics import Topics

log = logging.getLogger(__name__)

Publish = Callable[[str, Message], None]
"""Signs and publishes a message on a topic."""
Roster = Callable[[str, int], list[str]]
"""Returns the workers on a round's roster (``Checkpoints.roster``)."""
Saved = Callable[[str, int], tuple[set[str], set[str]]]
"""Returns the devices a round's saved shares heard from and counted (``saved_devices``)."""


class Phase(enum.Enum):
    """Where a round in flight is: which of the three messages the coordinator repeats."""

    TRAINING = "training"
    CLOSING = "closing"
    COMBINING = "combining"
    UNMASKING = "unmasking"
    """Secure aggregation: the sum is sealed; devices reveal the shares that unmask it."""


@dataclass(frozen=True)
class RoundStatus:
    """What the coordinator knows of a round in flight, for an operator watching it."""

    phase: Phase
    reported: int
    """Devices of the round's selection that answered, as the workers' progress said."""
    accepted: int
    """Devices of the selection whose update a worker folded (a step: updates folded)."""
    target: int
    minimum: int
    deadline_at: float
    remaining_s: float
    """Seconds to the deadline on the coordinator's clock (a viewer's clock may differ)."""


@dataclass
class _Round:
    """What the coordinator knows of one round in flight."""

    opened: RoundOpened
    asynchronous: bool
    tracked_at: float
    """When this coordinator began following the round (opened it, or recovered it)."""
    cohort: frozenset[str] = frozenset()
    """The selected devices, as a set: a progress message's ids are looked up in it."""
    reported: set[str] = field(default_factory=set)
    accepted: set[str] = field(default_factory=set)
    folded: dict[str, int] = field(default_factory=dict)
    """Updates in each worker's share, as it last said."""
    workers: set[str] = field(default_factory=set)
    """Workers that counted any report of the round: their partials are awaited."""
    ready: set[str] = field(default_factory=set)
    closed_at: float | None = None
    heard_at: float = 0.0
    """When the round last had news: a worker's, a saved share's (or it was closed)."""
    combining: bool = False
    unmasking: bool = False
    """A secure round's sum is sealed: nothing is repeated until its unmasking is ready."""
    unmask: ModelRef | None = None
    """A secure round's unmasking, once ready: every later combine request carries it."""
    last_sent: float = 0.0
    repeats: int = 0
    saved_read_at: float = 0.0
    """When the saved shares were last read for devices no progress named (or it was tracked)."""
    saved_reads: int = 0
    """Reads since the last news: each waits twice as long as the one before."""

    @property
    def phase(self) -> Phase:
        """Return the phase whose message is repeated now."""
        if self.unmasking:
            return Phase.UNMASKING
        if self.combining:
            return Phase.COMBINING
        return Phase.TRAINING if self.closed_at is None else Phase.CLOSING

    @property
    def complete(self) -> bool:
        """Return whether the target is met or every selected device has answered."""
        opened = self.opened
        if self.asynchronous:
            return sum(self.folded.values()) >= opened.target_reports
        answered = len(self.reported)  # only the cohort's are counted
        return len(self.accepted) >= opened.target_reports or answered >= len(self.cohort)


class RoundClosing:
    """Drives each round in flight from announcement to combination.

    Parameters
    ----------
    publish
        Signs and publishes a control message.
    topics
        The deployment's topics.
    clock
        The coordinator's clock (deadlines are in its time).
    """

    REPEAT_S = 5.0
    """How often the current phase's message is sent again."""
    COMBINE_REPEAT_MAX_S = 60.0
    """The longest interval between repeats of a combine request (they double from 5 s)."""
    PARTIALS_WAIT_S = 15.0
    """How long a closing round waits on silent workers before it is combined without them."""
    QUIET_S = 5.0
    """How long a training round goes without news before its saved shares are read.

    A worker that dies after saving updates and before its next progress
    (sent every 0.1 s) leaves devices no live worker reports: the saved shares
    name them, so the round closes when it is complete, not at its deadline.
    A round that stays quiet (devices still training) is read again after 10,
    20, then every 60 s, not every 5: the reads are store requests.
    """
    QUIET_MAX_S = 60.0
    """The longest wait between two reads of a quiet round's saved shares."""

    def __init__(
        self,
        publish: Publish,
        topics: Topics,
        clock: Callable[[], float] = time.time,
        *,
        roster: Roster = lambda _experiment, _round: [],
        saved: Saved = lambda _experiment, _round: (set(), set()),
    ) -> None:
        self._publish = publish
        self._topics = topics
        self._clock = clock
        self._roster = roster
        self._saved = saved
        self._rounds: dict[tuple[str, int], _Round] = {}

    def track(self, opened: RoundOpened, *, asynchronous: bool) -> None:
        """Announce a round and follow it until ``ended``."""
        key = (opened.experiment_id, opened.round)
        now = self._clock()
        self._rounds[key] = _Round(
            opened, asynchronous, now, frozenset(opened.selected), saved_read_at=now
        )
        self._send(self._rounds[key], opened)

    def progress(self, message: RoundProgress) -> None:
        """Count the devices a worker heard from; close the round once it is complete."""
        rnd = self._rounds.get((message.experiment_id, message.round))
        if rnd is None:
            return
        before = (len(rnd.workers), sum(rnd.folded.values()))
        rnd.workers.add(message.sender)
        if rnd.asynchronous:  # a share only grows: a repeat or a reordered message says less
            folded = max(rnd.folded.get(message.sender, 0), message.folded)
            rnd.folded[message.sender] = folded
        if (len(rnd.workers), sum(rnd.folded.values())) != before:
            rnd.heard_at = self._clock()
        self._count(rnd, message.reported, message.accepted)

    def _count(self, rnd: _Round, reported: Iterable[str], accepted: Iterable[str]) -> None:
        """Count devices of the cohort that answered and were accepted; close a complete round."""
        before = (len(rnd.reported), len(rnd.accepted))
        selected = rnd.cohort
        rnd.reported.update(d for d in reported if d in selected)
        rnd.accepted.update(d for d in accepted if d in selected)
        if (len(rnd.reported), len(rnd.accepted)) != before:
            rnd.heard_at = self._clock()  # news, not a repeat: the workers are at work
            rnd.saved_reads = 0
        if rnd.closed_at is None and rnd.complete:
            self._close(rnd)

    def ready(self, message: PartialReady) -> None:
        """Note a worker's durable partial; combine once every worker's is in."""
        rnd = self._rounds.get((message.experiment_id, message.round))
        if rnd is None or rnd.closed_at is None:
            return
        if message.sender not in rnd.ready:  # a repeat does not postpone the wait
            rnd.heard_at = self._clock()
        rnd.workers.add(message.sender)
        rnd.ready.add(message.sender)
        if not rnd.combining and self._all_ready(rnd):
            self._combine(rnd)

    def narrow(self, experiment_id: str, number: int, devices: frozenset[str]) -> None:
        """Wait only for ``devices`` of the cohort (a secure round's others cannot answer)."""
        rnd = self._rounds.get((experiment_id, number))
        if rnd is None:
            return
        rnd.cohort = rnd.cohort & devices
        if rnd.closed_at is None and rnd.complete:
            self._close(rnd)

    def masked(self, experiment_id: str, number: int) -> None:
        """Note that a secure round's combiner sealed its sum: stop repeating the request."""
        rnd = self._rounds.get((experiment_id, number))
        if rnd is not None and rnd.combining and rnd.unmask is None:
            rnd.unmasking = True

    def unmasked(self, experiment_id: str, number: int, unmask: ModelRef) -> None:
        """Ask for a secure round's combine again, now with the seeds that unmask its sum."""
        rnd = self._rounds.get((experiment_id, number))
        if rnd is None:
            return
        rnd.unmasking, rnd.unmask, rnd.combining, rnd.repeats = False, unmask, True, 0
        self._send(rnd, self._combine_request(rnd.opened, unmask))

    def ended(self, experiment_id: str, number: int) -> None:
        """Forget a round whose outcome arrived."""
        self._rounds.pop((experiment_id, number), None)

    def awaiting(self, device_id: str, *, opened_by: float) -> list[RoundOpened]:
        """Return the cohort rounds in training that selected ``device_id``, still unheard.

        Only rounds this coordinator followed before ``opened_by`` count.
        """
        return [
            rnd.opened
            for rnd in self._rounds.values()
            if not rnd.asynchronous
            and rnd.closed_at is None
            and rnd.tracked_at < opened_by
            and device_id in rnd.cohort
            and device_id not in rnd.reported
        ]

    def accepted(self, experiment_id: str, number: int) -> set[str]:
        """Return the devices of a round in flight whose update a worker folded so far."""
        rnd = self._rounds.get((experiment_id, number))
        return set() if rnd is None else set(rnd.accepted)

    def status(self, experiment_id: str, number: int) -> RoundStatus | None:
        """Return a round's phase and counts so far (None: not in flight here)."""
        rnd = self._rounds.get((experiment_id, number))
        if rnd is None:
            return None
        opened = rnd.opened
        accepted = sum(rnd.folded.values()) if rnd.asynchronous else len(rnd.accepted)
        return RoundStatus(
            phase=rnd.phase,
            reported=len(rnd.reported),
            accepted=accepted,
            target=opened.target_reports,
            minimum=opened.min_reports,
            deadline_at=opened.deadline_at,
            remaining_s=max(opened.deadline_at - self._clock(), 0.0),
        )

    def withdraw(self, experiment_id: str, number: int) -> bool:
        """Stop a round before its combine: close it once, then forget it; False if too late.

        The one ``CloseRound`` lets every worker make its share durable and
        release the updates it holds; nothing is repeated, and no combine is
        ever requested. A round whose combine request is out cannot be
        withdrawn: a worker may be writing its version, which the next round,
        on the same base version, would otherwise find in the store and take
        for its own.
        """
        rnd = self._rounds.get((experiment_id, number))
        if rnd is None:
            return True
        if rnd.combining and not rnd.unmasking:
            return False  # (a sealed sum awaiting its unmasking commits nothing without it)
        del self._rounds[(experiment_id, number)]
        self._send(rnd, CloseRound(experiment_id=experiment_id, round=number))
        return True

    def tick(self) -> None:
        """Close rounds past their deadline, stop waiting for silent workers, repeat messages."""
        now = self._clock()
        for rnd in list(self._rounds.values()):
            opened = rnd.opened
            if rnd.closed_at is None and now >= opened.deadline_at:
                self._close(rnd)
            elif self._waited_long_enough(rnd, now):
                self._combine(rnd)
            elif self._quiet(rnd, now):
                self._count_saved(rnd, now)
            if self._due(rnd, now):
                self._repeat(rnd)

    def _all_ready(self, rnd: _Round) -> bool:
        """Return whether every worker that reported or joined the roster sent its partial."""
        opened = rnd.opened
        expected = rnd.workers.union(self._roster(opened.experiment_id, opened.round))
        return rnd.ready >= expected

    def _waited_long_enough(self, rnd: _Round, now: float) -> bool:
        """Return whether a closing round has waited its time for silent workers' partials."""
        closing = rnd.closed_at is not None and not rnd.combining
        return closing and now - rnd.heard_at >= self.PARTIALS_WAIT_S

    def _quiet(self, rnd: _Round, now: float) -> bool:
        """Return whether a training round has heard nothing new for ``QUIET_S`` (or longer)."""
        if rnd.closed_at is not None or rnd.asynchronous:
            return False
        wait: float = min(self.QUIET_S * 2.0**rnd.saved_reads, self.QUIET_MAX_S)
        return now - max(rnd.heard_at, rnd.saved_read_at) >= wait

    def _count_saved(self, rnd: _Round, now: float) -> None:
        """Count the devices the round's saved shares name (a dead worker's included)."""
        rnd.saved_read_at = now
        rnd.saved_reads += 1
        opened = rnd.opened
        try:
            reported, accepted = self._saved(opened.experiment_id, opened.round)
        except Exception as exc:  # the store's own errors: the deadline still closes the round
            log.warning(
                "could not read %s round %d's saved shares: %s",
                opened.experiment_id,
                opened.round,
                exc,
                exc_info=rnd.saved_reads == 1,  # the traceback once, not every read
            )
            return
        self._count(rnd, reported, accepted)

    def _due(self, rnd: _Round, now: float) -> bool:
        """Return whether the round's current message is due again."""
        interval = self.REPEAT_S
        if rnd.unmasking:
            return False
        if rnd.combining:
            interval = min(self.REPEAT_S * 2**rnd.repeats, self.COMBINE_REPEAT_MAX_S)
        return now - rnd.last_sent >= interval

    def _repeat(self, rnd: _Round) -> None:
        """Send the round's current phase message again, signed afresh."""
        opened = rnd.opened
        if rnd.combining:
            rnd.repeats += 1
            self._send(rnd, self._combine_request(opened, rnd.unmask))
        elif rnd.closed_at is not None:
            self._send(rnd, CloseRound(experiment_id=opened.experiment_id, round=opened.round))
        else:
            # Signed in wall time like every signature (an emulated run's clock is
            # not): receivers refuse control signed long ago as replays.
            self._send(rnd, dataclasses.replace(opened, sent_at=time.time()))

    def _close(self, rnd: _Round) -> None:
        rnd.closed_at = rnd.heard_at = self._clock()
        opened = rnd.opened
        self._send(rnd, CloseRound(experiment_id=opened.experiment_id, round=opened.round))
        if self._all_ready(rnd):
            self._combine(rnd)  # no worker holds any of it: the combiner abandons it at once

    def _combine(self, rnd: _Round) -> None:
        rnd.combining = True
        self._send(rnd, self._combine_request(rnd.opened, rnd.unmask))

    @staticmethod
    def _combine_request(opened: RoundOpened, unmask: ModelRef | None) -> CombineRound:
        return CombineRound(
            experiment_id=opened.experiment_id,
            round=opened.round,
            base_version=opened.base_version,
            model=opened.model,
            min_reports=opened.min_reports,
            strategy=opened.strategy,
            unmask=unmask,
        )

    def _send(self, rnd: _Round, message: Message) -> None:
        exp = rnd.opened.experiment_id
        topic = (
            self._topics.combine(exp)
            if isinstance(message, CombineRound)
            else self._topics.control(exp)
        )
        self._publish(topic, message)
        rnd.last_sent = self._clock()
