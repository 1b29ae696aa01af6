"""The coordinator's side of asynchronous (FedBuff) experiments: tasks without a cohort barrier.

Round ``n`` of such an experiment is its ``n``-th server step. It opens on the
current model version ``v`` and ends when a worker commits ``v + 1`` from
``buffer_size`` updates, or when its deadline closes it. Tasks never wait for
a round to end: up to ``C = ceil(devices_per_round * over_selection)`` devices
train at once, and a slot that frees goes at once to an idle online device,
on whatever version is current then. A slot frees when its device checks in
again without saying it is still busy (devices check in after each update),
checks out, or lets its task pass the deadline (counted as dropped in the
round open at that moment).

A round's record lists the devices tasked while it was open (a device may
appear twice); the updates it folds may come from tasks of earlier rounds.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from aggregator_service.config import ExperimentConfig, build_strategy
from aggregator_service.persistence import Database, ExperimentRecord
from aggregator_service.rounds.pool import OnlinePool
from aggregator_service.rounds.records import new_round_record
from aggregator_service.strategies import FedBuff
from broker import CheckIn, ModelRef, RoundOpened
from model_store import WEIGHTS

SendTasks = Callable[[RoundOpened, ExperimentConfig, dict[str, ModelRef]], None]
"""Sends a task of the announcement's round to each device in its ``selected``."""
Announce = Callable[[RoundOpened], None]
"""Publishes a round's announcement and keeps repeating it until the round ends."""


def step_limits(config: ExperimentConfig) -> tuple[int, int]:
    """Return a server step's target and minimum of accepted updates.

    The target is the strategy's buffer size ``K``; the minimum a deadline
    may commit with is the rounds' minimum, capped by ``K``.
    """
    strategy = build_strategy(config.strategy)
    target = strategy.buffer_size if isinstance(strategy, FedBuff) else config.rounds.minimum
    return target, min(config.rounds.minimum, target)


@dataclass
class _Task:
    """A task out on a device: for which experiment, and until when."""

    experiment_id: str
    deadline_at: float


@dataclass
class _Step:
    """The open server step of one experiment."""

    opened: RoundOpened
    config: ExperimentConfig
    refs: dict[str, ModelRef]
    tasked: list[str] = field(default_factory=list)
    dropped: int = 0


class AsyncRounds:
    """Keeps every asynchronous experiment's devices busy; one instance per coordinator.

    Parameters
    ----------
    db
        Where rounds are recorded.
    clock
        The coordinator's clock.
    announce
        Publishes a step's ``RoundOpened`` (and schedules its repeats).
    send_tasks
        Sends a batch of tasks (the coordinator's task dispatch).
    sender
        The coordinator's name, the sender of its messages.
    """

    def __init__(
        self,
        db: Database,
        *,
        clock: Callable[[], float],
        announce: Announce,
        send_tasks: SendTasks,
        sender: str,
    ) -> None:
        self._db = db
        self._clock = clock
        self._announce = announce
        self._send_tasks = send_tasks
        self._sender = sender
        self._steps: dict[str, _Step] = {}
        self._busy: dict[str, _Task] = {}
        self._in_flight: Counter[str] = Counter()
        """Tasks out per experiment (the busy devices, counted)."""

    def open_step(
        self,
        exp: ExperimentRecord,
        config: ExperimentConfig,
        refs: dict[str, ModelRef],
        online: OnlinePool,
    ) -> None:
        """Open the experiment's next step on its current version and fill the free slots."""
        number = exp.current_round + 1
        now = self._clock()
        target, minimum = step_limits(config)
        chosen = self._choose(exp.id, config, number, 0, online)
        opened = RoundOpened(
            experiment_id=exp.id,
            round=number,
            base_version=exp.model_version,
            model=refs[WEIGHTS],
            selected=chosen,
            target_reports=target,
            min_reports=minimum,
            deadline_at=now + config.rounds.deadline_s,
            strategy=config.strategy,
            sender=self._sender,
        )
        self._db.add_round(new_round_record(opened, started_at=now))
        self._db.update_experiment(exp.id, state="running", current_round=number)
        self._announce(opened)
        step = _Step(opened, config, refs)
        self._steps[exp.id] = step
        self._assign(step, chosen, now)

    def resume(
        self, opened: RoundOpened, config: ExperimentConfig, refs: dict[str, ModelRef]
    ) -> None:
        """Track a step recovered after a restart; slots refill as devices check in."""
        self._steps[opened.experiment_id] = _Step(opened, config, refs, list(opened.selected))

    def step_ended(self, experiment_id: str, number: int) -> int | None:
        """Forget an ended step; return the tasks it saw dropped (None: not an asynchronous one)."""
        step = self._steps.get(experiment_id)
        if step is None or step.opened.round != number:
            return None
        del self._steps[experiment_id]
        return step.dropped

    def checked_in(
        self,
        device_id: str,
        capabilities: Mapping[str, object],
        experiment_id: str,
        online: OnlinePool,
    ) -> None:
        """Free the device's slot unless it says it is still busy, then fill free slots."""
        in_progress = capabilities.get(CheckIn.TASKS_IN_PROGRESS, 0)
        busy = isinstance(in_progress, int) and in_progress > 0
        task = self._busy.get(device_id)
        if task is not None and not busy:
            self._finished(device_id)
        elif task is None and busy and experiment_id in self._steps:
            # A task from before this coordinator's restart: keep the device out
            # of selection until such a task would have passed its deadline.
            deadline_s = self._steps[experiment_id].config.rounds.deadline_s
            self._started(device_id, _Task(experiment_id, self._clock() + deadline_s))
        self.fill(online)

    def checked_out(self, device_id: str, online: OnlinePool) -> None:
        """Count a departed device's task as dropped and give its slot to another device."""
        task = self._finished(device_id)
        if task is not None:
            self._dropped(task)
            self.fill(online)

    def expire(self, now: float, online: OnlinePool) -> None:
        """Drop the tasks past their deadline and give their slots to idle devices."""
        expired = [d for d, task in self._busy.items() if task.deadline_at <= now]
        for device_id in expired:
            task = self._finished(device_id)
            assert task is not None
            self._dropped(task)
        if expired:
            self.fill(online)

    def fill(self, online: OnlinePool) -> None:
        """Hand a task to idle devices until every open step's experiment has ``C`` in flight."""
        now = self._clock()
        for experiment_id in sorted(self._steps):
            step = self._steps[experiment_id]
            chosen = self._choose(
                experiment_id, step.config, step.opened.round, len(step.tasked), online
            )
            self._assign(step, chosen, now)

    def _choose(
        self,
        experiment_id: str,
        config: ExperimentConfig,
        number: int,
        draw: int,
        online: OnlinePool,
    ) -> tuple[str, ...]:
        """Return idle devices for the experiment's free slots, drawn reproducibly.

        A check-in while every slot is taken (most heartbeats) costs a look-up.
        """
        free = config.rounds.selection_size - self._in_flight[experiment_id]
        if free <= 0:
            return ()
        idle = [d for d in online.pool(experiment_id) if d not in self._busy]
        if not idle:
            return ()
        # Seed, step and the number of tasks already handed out in the step fix
        # the draw: the same sequence of check-ins gives the same tasks.
        rng = np.random.default_rng([config.seed, number, draw])
        drawn = rng.choice(len(idle), size=min(free, len(idle)), replace=False)
        return tuple(idle[i] for i in drawn)

    def _assign(self, step: _Step, devices: tuple[str, ...], now: float) -> None:
        """Send ``devices`` their tasks on the step's version and mark them busy."""
        if not devices:
            return
        deadline_at = now + step.config.rounds.deadline_s
        for device_id in devices:
            self._started(device_id, _Task(step.opened.experiment_id, deadline_at))
        step.tasked.extend(devices)
        self._db.update_round(
            step.opened.experiment_id, step.opened.round, selected=tuple(step.tasked)
        )
        batch = dataclasses.replace(step.opened, selected=devices, deadline_at=deadline_at)
        self._send_tasks(batch, step.config, step.refs)

    def _started(self, device_id: str, task: _Task) -> None:
        """Mark a device busy with ``task``."""
        self._busy[device_id] = task
        self._in_flight[task.experiment_id] += 1

    def _finished(self, device_id: str) -> _Task | None:
        """Mark a device idle again; return the task it had (None: it had none)."""
        task = self._busy.pop(device_id, None)
        if task is not None:
            self._in_flight[task.experiment_id] -= 1
            if not self._in_flight[task.experiment_id]:
                del self._in_flight[task.experiment_id]
        return task

    def _dropped(self, task: _Task) -> None:
        """Count a task that will not report against its experiment's open step."""
        step = self._steps.get(task.experiment_id)
        if step is not None:
            step.dropped += 1
