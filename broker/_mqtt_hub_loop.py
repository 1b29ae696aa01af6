"""The hub's thread: a selector loop that also runs posted commands and timers."""

from __future__ import annotations

import abc
import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("broker.mqtt_hub")

Command = Callable[[], None]
IDLE_WAIT_S = 1.0
"""The longest a select waits when no timer is due sooner."""


class EventLoop(abc.ABC):
    """One thread: wait on sockets, then run what other threads posted, then due timers.

    Subclasses say what a ready socket means (``_ready``), what else to do
    after each wait (``_after_events``) and when to stop (``_finished``).
    """

    def __init__(self, name: str) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for end in (self._wake_r, self._wake_w):
            end.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._woken = False
        self._commands: deque[Command] = deque()  # appended by any thread
        self._timers: list[tuple[float, int, Command]] = []  # the loop thread's alone
        self._sequence = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def on_loop_thread(self) -> bool:
        """Return whether the caller is the loop's thread."""
        return threading.current_thread() is self._thread

    def post(self, command: Command) -> None:
        """Run ``command`` on the loop's thread, soon (any thread)."""
        self._commands.append(command)
        if not self.on_loop_thread():
            self._wake()

    def call_later(self, delay_s: float, job: Command) -> None:
        """Run ``job`` on the loop's thread after ``delay_s`` (called on the loop's thread)."""
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._sequence), job))

    # -- for subclasses ----------------------------------------------------------

    @abc.abstractmethod
    def _ready(self, data: Any, events: int) -> None:
        """Handle a registered socket the selector found ready."""

    def _after_events(self) -> None:
        """Do what else is pending after each wait (an optional hook: nothing by default)."""
        return None

    @abc.abstractmethod
    def _finished(self) -> bool:
        """Return whether the loop should end."""

    def _wake(self) -> None:
        """Make the select return (any thread); one byte at a time is enough."""
        if not self._woken:
            self._woken = True
            with contextlib.suppress(OSError):
                self._wake_w.send(b"\0")

    def _close_loop(self, timeout: float) -> None:
        """Wake the loop to notice it is finished, wait for it, and release its sockets."""
        self.post(lambda: None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("%s did not stop within %g s", self._thread.name, timeout)
            return
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._finished():
            for key, events in self._selector.select(self._next_timer()):
                if key.data is None:
                    self._drain_wake()
                else:
                    self._ready(key.data, events)
            self._run_commands()
            self._after_events()
            self._run_timers()

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        # Cleared after the bytes are read and before the queues are: a post
        # that saw the flag still set is in the queues read next; one that
        # sees it clear writes a byte for the next select.
        self._woken = False

    def _run_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            try:
                command()
            except Exception:
                log.exception("%s: a command failed", self._thread.name)

    def _next_timer(self) -> float:
        if not self._timers:
            return IDLE_WAIT_S
        return min(max(self._timers[0][0] - time.monotonic(), 0.0), IDLE_WAIT_S)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, job = heapq.heappop(self._timers)
            try:
                job()
            except Exception:
                log.exception("%s: a timer failed", self._thread.name)
