"""The work other threads hand the AMQP I/O thread, and the nacked publishes it retries later."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from broker.retry import backoff

log = logging.getLogger("broker.amqp")


@dataclass(eq=False)
class Command:
    """Work for the I/O thread; ``retry`` runs it again if a reconnect or a nack interrupts it."""

    run: Callable[[], object]
    future: Future[Any] | None = None
    retry: bool = False
    nacks: int = 0
    """Times the broker nacked it so far (it waits longer before each retry)."""


class Nacked(Exception):
    """The broker nacked a publish: it could not take the message in, for now."""


class Retries:
    """Nacked publishes waiting for their retry, each after a back-off of its own.

    Only a nacked publish's own caller waits for it (``publish_timeout`` bounds
    that wait), so a queue the broker cannot take messages for, say a quorum
    queue electing a new leader, holds up no other command.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[float, Command]] = []

    def add(self, command: Command) -> None:
        """Schedule ``command`` again after its next back-off (0.05-2 s, growing)."""
        delay = backoff(command.nacks, base=0.1, cap=2.0)
        command.nacks += 1
        log.info("message nacked by the broker; retrying in %.2f s", delay)
        self._waiting.append((time.monotonic() + delay, command))

    def due(self) -> list[Command]:
        """Remove and return the commands whose retry is due."""
        now = time.monotonic()
        ready = [command for at, command in self._waiting if at <= now]
        if ready:
            self._waiting = [(at, command) for at, command in self._waiting if at > now]
        return ready

    def wait_limit(self, longest: float) -> float:
        """Return how long the loop may wait for the broker before a retry falls due."""
        if not self._waiting:
            return longest
        soonest = min(at for at, _ in self._waiting)
        return max(0.0, min(longest, soonest - time.monotonic()))

    def take_all(self) -> list[Command]:
        """Remove and return every waiting command (the transport is closing)."""
        waiting, self._waiting = self._waiting, []
        return [command for _, command in waiting]


def resolve(command: Command, *, result: object = None, exc: BaseException | None = None) -> None:
    """Hand the caller waiting on ``command`` its result or error (a no-op if it gave up)."""
    if command.future is None:
        if exc is not None:
            log.debug("dropped a command: %r", exc)
        return
    try:
        if exc is None:
            command.future.set_result(result)
        else:
            command.future.set_exception(exc)
    except InvalidStateError:
        pass  # the caller gave up waiting and cancelled it
