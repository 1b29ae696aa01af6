"""The devices online now, by experiment, and their last check-ins on the way to the database.

A fleet re-sends a signed ``CheckIn`` every heartbeat. Of a heartbeat from a
device already online nothing reaches the database at once: its time goes
into ``LastSeen``, which writes the pending times in a few statements, within
``LastSeen.every_s`` (a device that has just come online within a tick).
So 10,000 devices beating every 30 s cost a batched write every 10 s, not
333 writes a second; a crash loses at most the last-seen times not yet
written, never a round, an update or a registration.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import threading
from collections.abc import Sequence

from aggregator_service.persistence import Database, DatabaseError

log = logging.getLogger(__name__)

ANY = ""
"""The experiment of a device that trains for any experiment."""


class OnlinePool:
    """Devices checked in and not gone, each for one experiment or for any (``ANY``).

    Each experiment's devices are kept sorted, so a heartbeat costs a dict
    look-up and a cohort draw reads the pool without sorting it.
    """

    def __init__(self) -> None:
        self._where: dict[str, str] = {}
        self._sorted: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._where

    def check_in(self, device_id: str, experiment_id: str) -> bool:
        """Mark a device online for ``experiment_id``; return whether that is news.

        News is a device coming online or changing its experiment; a
        heartbeat of a device already online for the same one is not.
        """
        before = self._where.get(device_id)
        if before == experiment_id:
            return False
        if before is not None:
            self._remove(device_id, before)
        self._where[device_id] = experiment_id
        bisect.insort(self._sorted.setdefault(experiment_id, []), device_id)
        return True

    def check_out(self, device_id: str) -> bool:
        """Mark a device gone; return whether it was online."""
        before = self._where.pop(device_id, None)
        if before is None:
            return False
        self._remove(device_id, before)
        return True

    def count(self, experiment_id: str) -> int:
        """Return how many online devices an experiment may select."""
        extra = len(self._sorted.get(experiment_id, ())) if experiment_id != ANY else 0
        return len(self._sorted.get(ANY, ())) + extra

    def pool(self, experiment_id: str) -> list[str]:
        """Return the online devices an experiment may select, sorted."""
        anyone: Sequence[str] = self._sorted.get(ANY, ())
        own: Sequence[str] = self._sorted.get(experiment_id, ()) if experiment_id != ANY else ()
        if not own:
            return list(anyone)
        return list(heapq.merge(anyone, own))

    def devices(self) -> frozenset[str]:
        """Return every online device."""
        return frozenset(self._where)

    def _remove(self, device_id: str, experiment_id: str) -> None:
        ids = self._sorted[experiment_id]
        del ids[bisect.bisect_left(ids, device_id)]
        if not ids:
            del self._sorted[experiment_id]


class LastSeen:
    """Devices' last check-ins: kept in memory, written to the database in batches.

    Parameters
    ----------
    db
        Where the times are written (``Database.devices_seen``, one statement a batch).
    every_s
        The longest a heartbeat's time waits for its write.
    """

    BATCH = 2_000
    """The most times one statement writes (a SQLite write holds the database's lock)."""

    def __init__(self, db: Database, *, every_s: float, now: float) -> None:
        self.every_s = every_s
        self._db = db
        self._lock = threading.Lock()
        self._writing = threading.Lock()  # batches are written one at a time, in order
        self._pending: dict[str, float] = {}
        self._news = False
        self._flushed_at = now

    def seen(self, device_id: str, at: float, *, news: bool = False) -> None:
        """Note a check-in; ``news`` (a device coming online) is written at the next flush."""
        with self._lock:
            self._pending[device_id] = at
            self._news = self._news or news

    def pending(self, device_id: str) -> float | None:
        """Return a device's check-in time not written yet (None: nothing pending)."""
        with self._lock:
            return self._pending.get(device_id)

    def due(self, now: float) -> bool:
        """Return whether a batch should be written now."""
        with self._lock:
            return bool(self._pending) and (self._news or now - self._flushed_at >= self.every_s)

    def flush(self, now: float) -> int:
        """Write every pending time, ``BATCH`` a statement; return how many were written.

        Times the database refuses are kept (merged with newer ones) and
        tried again at the next flush.
        """
        with self._writing:
            with self._lock:
                pending, self._pending, self._news = list(self._pending.items()), {}, False
                self._flushed_at = now
            for start in range(0, len(pending), self.BATCH):
                batch = dict(pending[start : start + self.BATCH])
                try:
                    self._db.devices_seen(batch)
                except DatabaseError as exc:
                    self._keep(pending[start:])
                    log.warning("writing last-seen times failed; retrying: %s", exc)
                    return start
            return len(pending)

    def _keep(self, unwritten: list[tuple[str, float]]) -> None:
        """Put times back for the next flush, unless a newer one came meanwhile."""
        with self._lock:
            for device_id, at in unwritten:
                self._pending[device_id] = max(at, self._pending.get(device_id, at))
