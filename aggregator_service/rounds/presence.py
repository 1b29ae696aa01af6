"""Who is online: check-ins, what each device holds, and the wait for devices after a restart.

After a restart the online pool is empty until devices check in again. A
cohort drawn from whichever devices came back first would not be the one the
uninterrupted run draws, so no new round starts until every device seen
lately has checked in again, or a grace period has passed.

A device that promises heartbeats (``CheckIn.HEARTBEAT_S``) and misses
``SILENT_BEATS`` of them is taken for gone: its process died where no last
will reaches the coordinator (AMQP has none), and a cohort drawn with it
would wait for an update that never comes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from aggregator_service.persistence import Database, DeviceRecord
from aggregator_service.rounds.pool import LastSeen, OnlinePool


class Presence:
    """Devices online now, their declared example counts, and the devices awaited after a restart.

    Not locked: the coordinator calls it under its own lock. ``LastSeen`` locks
    itself, so ``flush`` may run outside.
    """

    SILENT_BEATS = 3
    """Heartbeats a device may miss before it is taken for gone (one lost beat is no news)."""
    SWEEP_EVERY_S = 1.0
    """How often ``silent`` looks for devices past their last promised beat."""
    HEARTBEAT_RANGE_S = (10.0, 86_400.0)
    """The promises taken: a shorter one counts as 10 s, a longer as a day.

    Silence is timed from when the coordinator reads a check-in; a stall of
    its own (a long combine, a broker's hiccup) must not take a device beating
    every second for gone: three beats are never less than 30 s.
    """

    RETURN_SETTLES_S = 5.0
    """How long after a device's return its lost task waits: an update it sent just
    before a restart is counted by then (workers report within 0.1 s of a fold), and
    a device asked to train the round again would be counted twice."""

    def __init__(self, db: Database, *, seen_every_s: float, clock: Callable[[], float]) -> None:
        self.online = OnlinePool()
        self._db = db
        self._clock = clock
        self._seen = LastSeen(db, every_s=seen_every_s, now=clock())
        self._declared: dict[str, int] = {}  # device id -> examples it says it holds
        self._awaited: set[str] = set()  # online before a restart, not checked in since
        self._grace_until = 0.0
        self._silent_at: dict[str, float] = {}  # device id -> when it is gone without a beat
        self._started_at: dict[str, float] = {}  # device id -> when its process started
        self._returns: dict[str, tuple[str, float]] = {}  # device -> (its experiment, back at)
        self._swept_at = clock()

    def await_return(self, grace_s: float) -> int:
        """Hold new rounds for up to ``grace_s`` until the devices seen lately are back.

        "Lately" is the last ``grace_s`` plus the longest a last-seen time
        waits for its write. Returns how many devices are awaited.
        """
        if grace_s <= 0:
            return 0
        now = self._clock()
        self._awaited = set(self._db.recently_seen(now - grace_s - self._seen.every_s))
        self._grace_until = now + grace_s if self._awaited else 0.0
        return len(self._awaited)

    def holding(self) -> bool:
        """Return whether new rounds wait for devices seen before a restart."""
        return self._clock() < self._grace_until

    def grace_until(self) -> float | None:
        """Return when the wait for returning devices ends (None: nothing is awaited)."""
        return self._grace_until if self.holding() else None

    def grace_over(self) -> bool:
        """End a wait whose time is up; return whether one just ended."""
        if self._grace_until and not self.holding():
            self._grace_until = 0.0
            return True
        return False

    def checked_in(
        self,
        device_id: str,
        experiment_id: str,
        examples: object,
        heartbeat_s: object = None,
        started_at: object = None,
    ) -> bool:
        """Note a check-in; return whether it is news.

        News is a device online now, for another experiment, or restarted
        (its ``started_at`` changed: it lost what it held in memory). A
        heartbeat costs no database write: its time is written in a batch.
        ``examples`` is what the device declares it holds (kept if a positive
        int); ``heartbeat_s`` how often it promises to check in (a positive
        number, or none: then it stays online until it checks out).
        """
        if isinstance(examples, int) and not isinstance(examples, bool) and examples > 0:
            self._declared[device_id] = examples
        now = self._clock()
        news = self.online.check_in(device_id, experiment_id)
        started = _seconds(started_at)
        if started is not None:
            news = self._started_at.get(device_id, started) != started or news
            self._started_at[device_id] = started
        self._seen.seen(device_id, now, news=news)
        promise = _seconds(heartbeat_s)
        if promise is None:
            self._silent_at.pop(device_id, None)
        else:
            low, high = self.HEARTBEAT_RANGE_S
            self._silent_at[device_id] = now + self.SILENT_BEATS * min(max(promise, low), high)
        return news

    def returned(self, device_id: str, experiment_id: str) -> None:
        """Note a device back online (or restarted): ``due_returns`` names it a little later."""
        self._returns[device_id] = (experiment_id, self._clock())

    def due_returns(self) -> list[tuple[str, str, float]]:
        """Return (and forget) the devices back ``RETURN_SETTLES_S`` or longer.

        Each with its experiment and when it came back.
        """
        if not self._returns:
            return []
        since = self._clock() - self.RETURN_SETTLES_S
        due = [(d, exp, at) for d, (exp, at) in self._returns.items() if at <= since]
        for device_id, _, _ in due:
            del self._returns[device_id]
        return due

    def checked_out(self, device_id: str) -> bool:
        """Note a device gone (checked out, its will, revoked); return whether it was online."""
        self._silent_at.pop(device_id, None)
        return self.online.check_out(device_id)

    def silent(self) -> list[str]:
        """Return the online devices that missed their promised beats, now taken for gone.

        Looks at most every ``SWEEP_EVERY_S``: a sweep reads every promise.
        """
        now = self._clock()
        if now - self._swept_at < self.SWEEP_EVERY_S:
            return []
        self._swept_at = now
        gone = sorted(d for d, at in self._silent_at.items() if at < now)
        for device_id in gone:
            self.checked_out(device_id)
        return gone

    def all_back(self, device_id: str) -> bool:
        """Note ``device_id`` is back; return whether it was the last awaited (the wait ends)."""
        if not self._awaited:
            return False
        self._awaited.discard(device_id)
        if self._awaited or not self._grace_until:
            return False
        self._grace_until = 0.0
        return True

    def declared(self, device_id: str) -> int | None:
        """Return how many examples a device said it holds (None: it did not say)."""
        return self._declared.get(device_id)

    def with_last_seen(self, records: list[DeviceRecord]) -> list[DeviceRecord]:
        """Return ``records`` with the last-seen times not written yet."""
        fresher = []
        for record in records:
            seen = self._seen.pending(record.id)
            if seen is not None and (record.last_seen is None or seen > record.last_seen):
                record = dataclasses.replace(record, last_seen=seen)
            fresher.append(record)
        return fresher

    def write_due(self) -> bool:
        """Return whether last-seen times should be written now."""
        return self._seen.due(self._clock())

    def write(self) -> None:
        """Write the last-seen times still in memory."""
        self._seen.flush(self._clock())


def _seconds(value: object) -> float | None:
    """Return ``value`` as a positive, finite number of seconds (None: it is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) and seconds > 0 else None
