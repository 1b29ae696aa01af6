"""The tasks a device has taken, so a task sent again is not trained again.

A task can come twice: a restarted coordinator sends a round's tasks again
(under new ids), and anyone who can publish to a device's topic can replay a
signed task within its ten minutes. Training it again would waste the
phone's battery and, with several workers, could count the device's update
twice. A cohort round is taken once whatever its task's id; an asynchronous
experiment's tasks (``check_in_when_done``) each once, since a device may
serve several of one server step. A task the device dropped unanswered (it
went offline mid-task) is released: the same round's task sent again is
taken.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from broker import TrainTask


class AnsweredTasks:
    """The last ``kept`` tasks (or cohort rounds) a device took and did not drop."""

    def __init__(self, kept: int = 64) -> None:
        self._kept = kept
        self._taken: OrderedDict[tuple[str, str, int | str], None] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, task: TrainTask) -> bool:
        """Note ``task`` taken; return whether it is new (not a repeat of one taken)."""
        key = _key(task)
        with self._lock:
            if key in self._taken:
                return False
            self._taken[key] = None
            if len(self._taken) > self._kept:
                self._taken.popitem(last=False)
            return True

    def release(self, task: TrainTask) -> None:
        """Forget ``task``: it ended without an answer, so it may be taken again."""
        with self._lock:
            self._taken.pop(_key(task), None)


def _key(task: TrainTask) -> tuple[str, str, int | str]:
    if task.training.get(TrainTask.CHECK_IN_WHEN_DONE) is True:
        return (task.experiment_id, "task", task.message_id)
    return (task.experiment_id, "round", task.round)
