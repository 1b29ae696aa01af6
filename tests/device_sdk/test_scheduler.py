"""The shared come-back-later scheduler: one thread, jobs in due order."""

from __future__ import annotations

import threading
import time

from broker import ComeBackLater, MemoryTransport
from device_sdk import ArtifactFetcher, DeviceApp, DeviceClient, TrainResult
from device_sdk.scheduler import Job, Scheduler
from tests.device_sdk.recorders import record_checkins
from tests.identities import SERVICE, TOPICS, device, sign


def _wait(condition: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def _scheduler_threads(name: str) -> int:
    return sum(1 for t in threading.enumerate() if t.name == name)


def test_jobs_run_in_due_order_after_their_delays() -> None:
    scheduler = Scheduler("test-scheduler")
    ran: list[tuple[str, float]] = []
    start = time.monotonic()
    try:
        for name, delay in (("late", 0.15), ("now", 0.0), ("soon", 0.05)):
            scheduler.call_later(delay, lambda n=name: ran.append((n, time.monotonic() - start)))

        assert _wait(lambda: len(ran) == 3)
        assert [name for name, _ in ran] == ["now", "soon", "late"]
        assert ran[2][1] >= 0.14
    finally:
        scheduler.close()


def test_the_thread_starts_with_the_first_job_and_one_serves_all() -> None:
    scheduler = Scheduler("test-lazy-scheduler")
    try:
        assert _scheduler_threads("test-lazy-scheduler") == 0
        done = threading.Event()
        for _ in range(100):
            scheduler.call_later(0.01, lambda: None)
        scheduler.call_later(0.02, done.set)

        assert done.wait(5)
        assert _scheduler_threads("test-lazy-scheduler") == 1
    finally:
        scheduler.close()


def test_a_failing_job_does_not_stop_the_next_and_close_drops_the_rest() -> None:
    scheduler = Scheduler("test-scheduler")
    ran: list[str] = []

    def explode() -> None:
        raise RuntimeError("boom")

    scheduler.call_later(0.0, explode)
    scheduler.call_later(0.01, lambda: ran.append("after"))
    scheduler.call_later(30.0, lambda: ran.append("never"))
    assert _wait(lambda: ran == ["after"])

    scheduler.close()
    scheduler.call_later(0.0, lambda: ran.append("closed"))
    time.sleep(0.05)

    assert ran == ["after"] and scheduler.pending == 0


class RecordingScheduler(Scheduler):
    """Keeps the jobs instead of timing them."""

    def __init__(self) -> None:
        super().__init__("unused")
        self.jobs: list[tuple[float, Job]] = []

    def call_later(self, delay_s: float, job: Job) -> None:
        self.jobs.append((delay_s, job))


def test_a_device_schedules_its_come_back_on_the_scheduler_it_is_given() -> None:
    transport = MemoryTransport()
    checkins = record_checkins(transport)
    scheduler = RecordingScheduler()
    app = DeviceApp()
    app.on_train(lambda task, ctx: TrainResult({}, 1))
    client = DeviceClient(
        app,
        transport,
        device("phone-9"),
        ArtifactFetcher(),
        service_key=SERVICE.public_key,
        topics=TOPICS,
        scheduler=scheduler,
    )
    client.start()
    transport.publish(
        TOPICS.device("phone-9"), sign(ComeBackLater(experiment_id="e", retry_after_s=42.0))
    )
    transport.join(timeout=5)

    ((delay, job),) = scheduler.jobs
    assert delay == 42.0 and len(checkins) == 1
    job()
    transport.join(timeout=5)
    assert len(checkins) == 2
    transport.close()
