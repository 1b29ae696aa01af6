"""Playing a trace: tasks take the trace's time, devices leave mid-task and come back."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from broker import (
    CheckIn,
    CheckOut,
    Delivery,
    ErrorReply,
    MemoryTransport,
    ModelRef,
    ModelUpdate,
    TrainTask,
    decode,
    encode_weights,
)
from device_sdk import ArtifactFetcher, DeviceApp, DeviceClient, DeviceContext, TrainResult
from device_sdk.emulator.profiles import TraceProfile, VirtualTime, paced
from device_sdk.emulator.traces import (
    OFFLINE_REASON,
    Availability,
    AvailabilityDriver,
    DeviceTrace,
    TaskAbandoned,
    Trace,
    WallClock,
)
from tests.identities import SERVICE, TOPICS, device, grant, sign

Event = tuple[str, str, float]
"""(what, device id, trace time): check_in, check_out, update or error."""


def test_fibers_pause_in_emulated_time_and_interleave_by_it() -> None:
    clock = VirtualTime()
    run = clock.fiber_runner()
    seen: list[tuple[str, float]] = []

    def job(name: str, waits: list[float]) -> Callable[[], None]:
        def go() -> None:
            for wait in waits:
                seen.append((name, clock()))
                clock.sleep_until(clock() + wait)
            seen.append((f"{name} done", clock()))

        return go

    run(job("a", [5.0, 5.0]))
    run(job("b", [3.0]))
    while clock.advance():
        pass

    assert seen == [("a", 0.0), ("b", 0.0), ("b done", 3.0), ("a", 5.0), ("a done", 10.0)]


def test_closing_the_clock_ends_paused_fibers_and_failures_surface() -> None:
    clock = VirtualTime()
    run = clock.fiber_runner()
    cleaned: list[str] = []

    def forever() -> None:
        try:
            clock.sleep_until(1e9)
            cleaned.append("resumed")  # never: the run ends first
        finally:
            cleaned.append("cleaned up")

    def broken() -> None:
        raise ValueError("trainer bug")

    run(forever)
    assert clock.advance()
    clock.close()
    run(broken)

    with pytest.raises(ValueError, match="trainer bug"):
        clock.advance()
    assert cleaned == ["cleaned up"] and clock.pending == 0
    with pytest.raises(RuntimeError, match="fiber_runner"):
        clock.sleep_until(5.0)


def test_a_step_limit_lets_the_caller_look_between_distant_events() -> None:
    clock = VirtualTime(max_step_s=5.0)
    done: list[float] = []
    clock.call_at(12.0, lambda: done.append(clock()))

    steps = 0
    while clock.advance():
        steps += 1

    assert done == [12.0] and steps == 3  # 5, 10, then the job at 12


# -- devices on a bus, paced by a trace -------------------------------------------------

ALWAYS = Availability.always(20.0)
LEAVES = Availability(((0.0, 3.0), (10.0, 20.0)), 20.0)  # 10..20 runs on into 20..23
TRACE = Trace(
    (
        DeviceTrace("steady", 10.0, 8.0, 8.0, ALWAYS),  # 100 examples x 2 epochs: 2 s
        DeviceTrace("leaves", 20.0, 8.0, 8.0, LEAVES),  # 4 s: outlasts the 0..3 window
    ),
    20.0,
)


class Bus:
    """Two devices on an in-process bus, and what they publish, timed by ``clock``."""

    def __init__(self, tmp_path: Path, profile: TraceProfile, clock: Callable[[], float]) -> None:
        self.transport = MemoryTransport()
        self.events: list[Event] = []
        self.clock = clock
        weights = encode_weights({"w": np.zeros(4, np.float32)})
        (tmp_path / "w").write_bytes(weights)
        digest = hashlib.sha256(weights).hexdigest()
        self.model = ModelRef((tmp_path / "w").as_uri(), digest, len(weights))
        self.transport.subscribe(TOPICS.all_checkins, self._record)
        self.transport.subscribe(TOPICS.all_updates, self._record)
        self.clients = [self._client(f"phone-{i}", i, profile) for i in range(2)]

    def _client(self, name: str, index: int, profile: TraceProfile) -> DeviceClient:
        app = DeviceApp()

        def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
            return TrainResult({k: v + 1 for k, v in ctx.weights.items()}, 100)

        virtual = self.clock if isinstance(self.clock, VirtualTime) else None
        run = None if virtual else self.executor.submit
        handler, runner = paced(train, run, index, profile, virtual)
        app.on_train(handler)
        return DeviceClient(
            app,
            self.transport,
            device(name),
            ArtifactFetcher(),
            service_key=SERVICE.public_key,
            topics=TOPICS,
            run=runner,
        )

    @property
    def executor(self) -> ThreadPoolExecutor:
        if not hasattr(self, "_executor"):
            self._executor = ThreadPoolExecutor(2)
        return self._executor

    def task(self, device_id: str) -> Callable[[], None]:
        task = TrainTask(
            experiment_id="e1", round=1, base_version=0, model=self.model, training={"epochs": 2}
        )
        task = dataclasses.replace(task, grant=grant("e1", 1, device_id, task.message_id))
        return lambda: self.transport.publish(TOPICS.device(device_id), sign(task))

    def _record(self, delivery: Delivery) -> None:
        message = decode(delivery.body)
        if isinstance(message, CheckIn):
            self.events.append(("check_in", message.device_id, self.clock()))
        elif isinstance(message, CheckOut):
            assert message.reason == OFFLINE_REASON
            self.events.append(("check_out", message.device_id, self.clock()))
        elif isinstance(message, ModelUpdate):
            self.events.append(("update", message.device_id, self.clock()))
        elif isinstance(message, ErrorReply):
            self.events.append(("error", message.sender, self.clock()))
        delivery.ack()

    def of(self, device_id: str) -> list[tuple[str, float]]:
        return [(what, round(at, 1)) for what, who, at in self.events if who == device_id]


def test_in_emulated_time_a_device_drops_its_task_goes_offline_and_returns(
    tmp_path: Path,
) -> None:
    clock = VirtualTime()
    bus = Bus(tmp_path, TraceProfile(name="t", trace=TRACE), clock)
    driver = AvailabilityDriver(TRACE, clock)
    for client in bus.clients:
        client.start()
    driver.attach(bus.clients)
    bus.task("phone-0")()
    bus.task("phone-1")()
    clock.call_at(12.0, bus.task("phone-1"))  # back online by then

    bus.transport.join(timeout=10)
    while clock.now < 35.0 and clock.advance():
        bus.transport.join(timeout=10)
    bus.transport.close()

    assert bus.of("phone-0") == [("check_in", 0.0), ("update", 2.0)]
    # the 0..3 window closes mid-task: no update and no error reply, a check-out;
    # back at 10, a task of 4 s done at 16, out at 23 (10..20 and 20..23), in at 30
    assert bus.of("phone-1") == [
        ("check_in", 0.0),
        ("check_out", 3.0),
        ("check_in", 10.0),
        ("update", 16.0),
        ("check_out", 23.0),
        ("check_in", 30.0),
    ]
    assert (driver.went_offline, driver.came_online) == (2, 2)
    assert driver.is_online(1) and driver.online_count() == 2
    assert clock.max_step_s == 5.0  # a trace makes the clock stop for deadlines


def test_in_real_time_a_device_sleeps_out_its_task_and_leaves_when_its_window_closes(
    tmp_path: Path,
) -> None:
    # 100 examples x 2 epochs x 1.5 ms = 0.3 s; online 0..0.5 s and 1.0..2.0 s
    windows = Availability(((0.0, 0.5), (1.0, 2.0)), 2.0)
    trace = Trace((DeviceTrace("short", 1.5, 100.0, 100.0, windows),), 2.0)
    profile = TraceProfile(name="short", trace=trace)
    clock = profile.wall_clock
    bus = Bus(tmp_path, profile, clock)
    phone = bus.clients[0]
    phone.start()
    AvailabilityDriver(trace, clock).attach([phone])
    try:
        bus.task("phone-0")()
        _wait_for(lambda: ("update", "phone-0") in {e[:2] for e in bus.events})
        bus.task("phone-0")()  # at ~0.3 s: would end at ~0.6 s, after the window
        clock.sleep_until(1.3)
    finally:
        clock.close()
        bus.executor.shutdown(wait=True)
        bus.transport.close()

    seen = [(what, at) for what, who, at in bus.events if who == "phone-0"]
    assert [what for what, _ in seen] == ["check_in", "update", "check_out", "check_in"]
    assert seen[1][1] == pytest.approx(0.3, abs=0.1)
    assert seen[2][1] == pytest.approx(0.5, abs=0.1)
    assert seen[3][1] == pytest.approx(1.0, abs=0.1)


def test_a_trace_profile_abandons_a_task_on_an_offline_device_without_training() -> None:
    trace = Trace((DeviceTrace("never", 1.0, 1.0, 1.0, Availability((), 10.0)),), 10.0)
    trained: list[str] = []

    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        trained.append(ctx.device_id)
        return TrainResult({}, 1)

    handler = TraceProfile(name="t", trace=trace).slowed(train, 0, sleep=time.sleep)
    ctx = DeviceContext("phone-9", {}, {}, ArtifactFetcher())

    with pytest.raises(TaskAbandoned, match="phone-9 is offline"):
        handler(None, ctx)  # type: ignore[arg-type]
    assert trained == []


def _wait_for(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        threading.Event().wait(0.01)


def test_the_wall_clock_runs_jobs_in_time_order_on_one_thread_until_closed() -> None:
    clock = WallClock()
    ran: list[tuple[str, str]] = []

    def job(name: str) -> Callable[[], None]:
        return lambda: ran.append((name, threading.current_thread().name))

    clock.call_at(0.2, job("second"))
    clock.call_at(0.1, job("first"))
    clock.call_at(60.0, job("never"))
    _wait_for(lambda: len(ran) == 2)
    clock.close()
    clock.call_at(0.0, job("after close"))
    time.sleep(0.05)

    assert ran == [("first", "fedmq-trace"), ("second", "fedmq-trace")]
