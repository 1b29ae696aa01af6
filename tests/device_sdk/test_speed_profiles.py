"""Device speed profiles, emulated time, and the check-in that says a device is idle again."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from broker import (
    MemoryTransport,
    ModelRef,
    TrainTask,
    encode_weights,
)
from device_sdk import ArtifactFetcher, DeviceApp, DeviceClient, DeviceContext, TrainResult
from device_sdk.emulator.profiles import (
    ProfileError,
    SpeedProfile,
    VirtualTime,
    heterogeneous,
    load_profile,
)
from tests.device_sdk.recorders import record_checkins
from tests.identities import SERVICE, TOPICS, device, grant, sign


def test_heterogeneous_deals_exact_tier_shares_reproducibly() -> None:
    profile = heterogeneous(seed=3, devices=20)

    factors = [profile.factor(i) for i in range(20)]

    assert sorted(factors) == [1.0] * 10 + [3.0] * 6 + [10.0] * 4
    assert factors == [heterogeneous(seed=3, devices=20).factor(i) for i in range(20)]
    assert factors != [heterogeneous(seed=4, devices=20).factor(i) for i in range(20)]
    assert profile.summary(range(20)) == {"1x": 10, "3x": 6, "10x": 4}
    assert profile.delay_s(factors.index(10.0), 0.5) == pytest.approx(4.5)  # (10 - 1) * 0.5


def test_a_trace_gives_delays_or_factors_by_device_index(tmp_path: Path) -> None:
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"0": 2.5, "1": {"factor": 4}, "3": {"delay_s": 0}}))

    profile = load_profile(str(trace))

    assert [profile.delay_s(i, 1.0) for i in range(4)] == [2.5, 3.0, 0.0, 0.0]
    assert profile.duration_s(1, 2.0) == 8.0 and profile.duration_s(0, 2.0) == 4.5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "expected an object"),
        ('{"x": 1}', "not a device index"),
        ('{"0": -1}', "expected a number >= 0"),
        ('{"0": {"factor": 0.5}}', "expected a number >= 1"),
        ("{", "not valid JSON"),
    ],
)
def test_a_bad_trace_is_refused_with_a_clear_error(
    tmp_path: Path, content: str, message: str
) -> None:
    trace = tmp_path / "bad.json"
    trace.write_text(content)

    with pytest.raises(ProfileError, match=message):
        load_profile(str(trace))
    with pytest.raises(ProfileError, match="unknown speed profile"):
        load_profile("fastest")


def test_a_slowed_handler_waits_factor_minus_one_times_its_training_time() -> None:
    slept: list[float] = []
    profile = SpeedProfile(factors={0: 3.0}, delays_s={1: 7.0})

    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        return TrainResult({}, 1)

    for index in (0, 1):
        profile.slowed(train, index, sleep=slept.append)(None, None)  # type: ignore[arg-type]

    assert slept[0] == pytest.approx(0.0, abs=0.01)  # 2 x a training of ~0 s
    assert slept[1] == 7.0


def test_virtual_time_completes_trainings_in_order_of_their_emulated_duration() -> None:
    clock = VirtualTime(nominal_s=1.0)
    done: list[tuple[str, float]] = []
    slow, fast = clock.runner(10.0), clock.runner(1.0)

    slow(lambda: done.append(("slow", clock())))
    fast(lambda: done.append(("fast", clock())))
    fast(lambda: done.append(("fast again", clock())))
    while clock.advance():
        pass

    assert done == [("fast", 1.0), ("fast again", 1.0), ("slow", 10.0)]


def test_a_device_checks_in_idle_after_each_update(tmp_path: Path) -> None:
    transport = MemoryTransport()
    app = DeviceApp()

    @app.on_train
    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        client.check_in()  # a heartbeat while training
        return TrainResult({k: v + 1 for k, v in ctx.weights.items()}, 5)

    client = DeviceClient(
        app,
        transport,
        device("phone-9"),
        ArtifactFetcher(),
        service_key=SERVICE.public_key,
        topics=TOPICS,
    )

    checkins = record_checkins(transport)
    ref = _model(tmp_path)
    client.start()
    asynchronous = {TrainTask.CHECK_IN_WHEN_DONE: True}
    for training in (asynchronous, {}):
        transport.publish(TOPICS.device("phone-9"), _task("phone-9", ref, training))
        transport.join(timeout=10)
    transport.close()

    # online, busy during training, idle again once the update is out; a task
    # of a synchronous experiment (no check_in_when_done) gets no idle check-in
    assert [c.capabilities["tasks_in_progress"] for c in checkins] == [0, 1, 0, 1]
    assert client.stats.updates_sent == 2


def test_a_device_that_abandoned_its_task_checks_in_idle_again(tmp_path: Path) -> None:
    # A trace takes a device offline mid-task: the task ends unanswered. Counted
    # as still in progress, the device would look busy to the FedBuff coordinator
    # for good once back, and never get another task.
    from device_sdk.emulator._trace_pacing import TaskAbandoned, abandonable

    transport = MemoryTransport()
    app = DeviceApp()

    @app.on_train
    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        raise TaskAbandoned("offline at trace second 12")

    client = DeviceClient(
        app,
        transport,
        device("phone-8"),
        ArtifactFetcher(),
        service_key=SERVICE.public_key,
        topics=TOPICS,
        run=abandonable(None),
    )

    checkins = record_checkins(transport)
    ref = _model(tmp_path)
    client.start()
    transport.publish(TOPICS.device("phone-8"), _task("phone-8", ref, {}))
    transport.join(timeout=10)
    client.check_in()  # back online
    transport.join(timeout=10)
    transport.close()

    assert (client.stats.tasks, client.stats.abandoned, client.stats.updates_sent) == (1, 1, 0)
    assert [c.capabilities["tasks_in_progress"] for c in checkins] == [0, 0]


def _model(folder: Path) -> ModelRef:
    """Return a reference to a tiny model written in ``folder``."""
    data = encode_weights({"w": np.zeros(2, np.float32)})
    (folder / "w").write_bytes(data)
    return ModelRef((folder / "w").as_uri(), hashlib.sha256(data).hexdigest(), len(data))


def _task(device_id: str, ref: ModelRef, training: dict[str, Any]) -> bytes:
    """Return a signed, granted round-1 task of experiment e1 for ``device_id``."""
    task = TrainTask(experiment_id="e1", round=1, base_version=0, model=ref, training=training)
    task = dataclasses.replace(task, grant=grant("e1", 1, device_id, task.message_id))
    return sign(task)
