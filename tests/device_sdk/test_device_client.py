"""The device refuses corrupted artifacts and caches good ones by checksum."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from broker import (
    ChecksumMismatch,
    Delivery,
    ErrorReply,
    FetchError,
    MemoryTransport,
    Message,
    ModelRef,
    ModelUpdate,
    TrainTask,
    decode,
    decode_weights,
    encode,
    encode_weights,
)
from broker.identity import Identity
from device_sdk import ArtifactFetcher, DeviceApp, DeviceClient, DeviceContext, TrainResult
from tests.broker.conftest import wait_until
from tests.identities import SERVICE, TOPICS, device, grant, sign


def _file_ref(path: Path, data: bytes, *, sha256: str | None = None) -> ModelRef:
    path.write_bytes(data)
    return ModelRef(path.as_uri(), sha256 or hashlib.sha256(data).hexdigest(), len(data))


def test_fetch_verifies_the_checksum_and_refuses_a_corrupted_artifact(tmp_path: Path) -> None:
    good = b"weights" * 100
    ref = _file_ref(tmp_path / "a", good)
    (tmp_path / "a").write_bytes(b"tampered" * 100)

    with pytest.raises(ChecksumMismatch, match="refused"):
        ArtifactFetcher().fetch(ref)


def test_fetch_caches_by_checksum(tmp_path: Path) -> None:
    data = b"x" * 1000
    ref = _file_ref(tmp_path / "a", data)
    fetcher = ArtifactFetcher(tmp_path / "cache")

    first = fetcher.fetch(ref)
    (tmp_path / "a").unlink()  # a cache hit must not touch the origin
    second = fetcher.fetch(ref)

    assert first == second == data
    assert fetcher.downloads == 1
    assert (tmp_path / "cache" / ref.sha256).read_bytes() == data


def test_a_damaged_disk_cache_entry_is_dropped_and_fetched_again(tmp_path: Path) -> None:
    data = b"y" * 1000
    ref = _file_ref(tmp_path / "a", data)
    ArtifactFetcher(tmp_path / "cache").fetch(ref)
    (tmp_path / "cache" / ref.sha256).write_bytes(b"rot")

    fresh = ArtifactFetcher(tmp_path / "cache")

    assert fresh.fetch(ref) == data
    assert fresh.downloads == 1


def test_unreachable_artifacts_raise_fetch_error(tmp_path: Path) -> None:
    with pytest.raises(FetchError):
        ArtifactFetcher().fetch(ModelRef((tmp_path / "missing").as_uri(), "0" * 64, 1))
    with pytest.raises(FetchError, match="unsupported scheme"):
        ArtifactFetcher().fetch(ModelRef("gopher://x/y", "0" * 64, 1))


def _client(app: DeviceApp, transport: MemoryTransport, device_id: str) -> DeviceClient:
    """Return a device registered as ``device_id`` that pins the test service's key."""
    return DeviceClient(
        app,
        transport,
        device(device_id),
        ArtifactFetcher(),
        service_key=SERVICE.public_key,
        topics=TOPICS,
    )


def _task(model_ref: ModelRef, device_id: str = "phone-1") -> TrainTask:
    """Return a task for ``device_id`` carrying the service's grant of it."""
    task = TrainTask(experiment_id="e1", round=1, base_version=0, model=model_ref)
    return dataclasses.replace(task, grant=grant("e1", 1, device_id, task.message_id))


def _run_device(
    tmp_path: Path, model_ref: ModelRef, frame: Callable[[TrainTask], bytes] = sign
) -> tuple[list[Message], list[str]]:
    """Send one task to a device whose handler adds 1 to every weight; return its replies."""
    transport = MemoryTransport()
    replies: list[Message] = []
    trained: list[str] = []
    app = DeviceApp()

    @app.on_train
    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        trained.append(ctx.device_id)
        return TrainResult({k: v + 1 for k, v in ctx.weights.items()}, 5, {"loss": 0.25})

    def collect(delivery: Delivery) -> None:
        replies.append(decode(delivery.body))
        delivery.ack()

    # The device publishes only to its own update topic.
    transport.subscribe(TOPICS.updates("e1", "phone-1"), collect)
    _client(app, transport, "phone-1").start()
    transport.publish(TOPICS.device("phone-1"), frame(_task(model_ref)))
    transport.join(timeout=10)
    transport.close()
    return replies, trained


def test_the_device_trains_and_publishes_its_update(tmp_path: Path) -> None:
    weights = {"w": np.zeros(3, np.float32)}
    ref = _file_ref(tmp_path / "w", encode_weights(weights))

    replies, trained = _run_device(tmp_path, ref)

    (update,) = replies
    assert isinstance(update, ModelUpdate) and trained == ["phone-1"]
    assert update.num_examples == 5 and update.metrics == {"loss": 0.25}
    assert update.sender == "phone-1" and update.grant  # signed by the device, grant returned
    np.testing.assert_array_equal(decode_weights(update.inline_weights or b"")["w"], np.ones(3))


def test_a_device_refuses_a_task_whose_model_fails_its_checksum(tmp_path: Path) -> None:
    data = encode_weights({"w": np.zeros(3, np.float32)})
    ref = _file_ref(tmp_path / "w", data, sha256=hashlib.sha256(b"other").hexdigest())

    replies, trained = _run_device(tmp_path, ref)

    (reply,) = replies
    assert isinstance(reply, ErrorReply)
    assert reply.code == "checksum_mismatch"
    assert trained == []  # never trained on unverified weights


@pytest.mark.parametrize("forgery", ["unsigned", "another key", "a device's key"])
def test_a_device_ignores_a_task_the_service_did_not_sign(tmp_path: Path, forgery: str) -> None:
    ref = _file_ref(tmp_path / "w", encode_weights({"w": np.zeros(3, np.float32)}))
    frames: dict[str, Callable[[TrainTask], bytes]] = {
        "unsigned": encode,
        "another key": lambda task: encode(task, Identity.generate(SERVICE.name)),
        "a device's key": lambda task: sign(task, device("phone-1")),
    }

    replies, trained = _run_device(tmp_path, ref, frames[forgery])

    assert replies == [] and trained == []


def test_a_device_told_to_come_back_later_checks_in_again(tmp_path: Path) -> None:
    from broker import CheckIn, ComeBackLater

    transport = MemoryTransport()
    checkins: list[float] = []

    def record(delivery: Delivery) -> None:
        if isinstance(decode(delivery.body), CheckIn):
            checkins.append(time.monotonic())
        delivery.ack()

    transport.subscribe(TOPICS.all_checkins, record)
    app = DeviceApp()
    app.on_train(lambda task, ctx: TrainResult({}, 1))
    client = _client(app, transport, "phone-2")
    client.start()
    transport.join(timeout=5)
    told = time.monotonic()
    transport.publish(
        TOPICS.device("phone-2"), sign(ComeBackLater(experiment_id="e", retry_after_s=0.2))
    )

    assert wait_until(lambda: len(checkins) >= 2, timeout=5)
    assert len(checkins) == 2  # the first check-in, then one more when told
    assert checkins[1] - told >= 0.2
    client.close()
    assert not [t for t in threading.enumerate() if t.name == "fedmq-come-back-phone-2"]
    transport.close()


@contextlib.contextmanager
def _serve_after(delay_s: float, port: int, body: bytes) -> Iterator[None]:
    """Serve ``body`` on ``port`` from ``delay_s`` on (a service coming back up), until the end."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.startswith("/missing"):
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    servers: list[http.server.ThreadingHTTPServer] = []
    ending = threading.Event()

    def run() -> None:
        if ending.wait(delay_s):
            return
        servers.append(http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler))
        servers[0].serve_forever()

    starter = threading.Thread(target=run, daemon=True)
    starter.start()
    try:
        yield
    finally:
        ending.set()
        if servers:
            servers[0].shutdown()
            servers[0].server_close()
        starter.join(5)


def test_downloads_retry_while_the_service_is_briefly_unreachable() -> None:
    from tests.ports import free_port

    body = b"weights" * 50
    port = free_port()
    ref = ModelRef(f"http://127.0.0.1:{port}/blob", hashlib.sha256(body).hexdigest(), len(body))

    with _serve_after(0.5, port, body):
        assert ArtifactFetcher(retry_for_s=10).fetch(ref) == body


def test_a_missing_artifact_is_not_retried() -> None:
    from tests.ports import free_port

    port = free_port()
    ref = ModelRef(f"http://127.0.0.1:{port}/missing", "0" * 64, 1)

    with _serve_after(0.0, port, b""):
        time.sleep(0.3)
        started = time.monotonic()
        with pytest.raises(FetchError, match="HTTP 404"):
            ArtifactFetcher(retry_for_s=10).fetch(ref)
    assert time.monotonic() - started < 5


def test_a_device_that_left_stays_out_of_the_pool_until_it_rejoins(tmp_path: Path) -> None:
    # A trace takes a device away with stop(); a heartbeat, a reconnect or a
    # come-back-later timer firing meanwhile used to check it in again (seen under
    # load: a device back in the pool 4 s before its window opened).
    from broker import CheckIn, CheckOut, ComeBackLater

    class HeldTimers:
        """A scheduler whose jobs run only when the test says."""

        def __init__(self) -> None:
            self.jobs: list[Callable[[], None]] = []

        def call_later(self, delay_s: float, job: Callable[[], None]) -> None:
            self.jobs.append(job)

    transport = MemoryTransport()
    said: list[str] = []

    def record(delivery: Delivery) -> None:
        said.append(type(decode(delivery.body)).__name__)
        delivery.ack()

    transport.subscribe(TOPICS.all_checkins, record)
    app = DeviceApp()
    app.on_train(lambda task, ctx: TrainResult({}, 1))
    timers = HeldTimers()
    client = DeviceClient(
        app,
        transport,
        device("phone-3"),
        ArtifactFetcher(),
        service_key=SERVICE.public_key,
        topics=TOPICS,
        scheduler=timers,  # type: ignore[arg-type]
    )
    client.start()
    transport.publish(
        TOPICS.device("phone-3"), sign(ComeBackLater(experiment_id="e", retry_after_s=0.1))
    )
    transport.join(timeout=5)
    assert len(timers.jobs) == 1

    client.stop("offline (trace)")
    client.check_in()  # what a heartbeat or a reconnect does
    timers.jobs.pop()()  # the come-back-later timer fires while the device is away
    transport.join(timeout=5)
    away = list(said)
    client.rejoin()
    client.check_in()
    transport.join(timeout=5)

    assert away == [CheckIn.__name__, CheckOut.__name__]
    assert said == [*away, CheckIn.__name__, CheckIn.__name__]
    transport.close()


def _trained(tasks: list[TrainTask]) -> tuple[list[TrainTask], DeviceClient]:
    """Send ``tasks`` in order to a fresh device; return those it trained, and the device."""
    transport = MemoryTransport()
    trained: list[TrainTask] = []
    app = DeviceApp()

    @app.on_train
    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        trained.append(task)
        return TrainResult(ctx.weights, 1)

    client = _client(app, transport, "phone-1")
    client.start()
    for task in tasks:
        transport.publish(TOPICS.device("phone-1"), sign(task))
    transport.join(timeout=10)
    transport.close()
    return trained, client


def test_a_task_sent_again_is_not_trained_again(tmp_path: Path) -> None:
    # A replayed task (anyone may publish to the device's topic) and a restarted
    # coordinator's resend (a new task id, the same round) are each answered once.
    ref = _file_ref(tmp_path / "w", encode_weights({"w": np.zeros(3, np.float32)}))
    first = _task(ref)
    resent = _task(ref)  # the same round under a new id, as after a coordinator restart
    second_round = dataclasses.replace(_task(ref), round=2)

    trained, client = _trained([first, first, resent, second_round])

    assert [t.message_id for t in trained] == [first.message_id, second_round.message_id]
    assert client.stats.refused["repeated_task"] == 2


def test_asynchronous_tasks_of_one_step_are_each_trained(tmp_path: Path) -> None:
    ref = _file_ref(tmp_path / "w", encode_weights({"w": np.zeros(3, np.float32)}))
    tasks = [
        dataclasses.replace(_task(ref), training={TrainTask.CHECK_IN_WHEN_DONE: True})
        for _ in range(2)
    ]

    trained, _ = _trained([*tasks, tasks[0]])

    assert [t.message_id for t in trained] == [t.message_id for t in tasks]
