"""The transport offload: a proxy transport over a socket, and the child process behind it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from broker import ConnectionLost, Delivery, Handler, MemoryTransport, Subscription, TransportError
from broker._offload_wire import Link
from broker.offload import OffloadedProcess, OffloadError, ProxyTransport, TransportHost
from tests.broker.conftest import wait_until
from tests.broker.offload_targets import broken, echo

REPO = Path(__file__).resolve().parents[2]


class Recording:
    """A transport wrapper that keeps the real deliveries it hands out and can fail publishes."""

    def __init__(self, inner: MemoryTransport) -> None:
        self.inner = inner
        self.deliveries: list[Delivery] = []
        self.fail_with: Exception | None = None

    def publish(self, topic: str, body: bytes) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.inner.publish(topic, body)

    def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> Subscription:
        def keep(delivery: Delivery) -> None:
            self.deliveries.append(delivery)
            handler(delivery)

        return self.inner.subscribe(topic, keep, group=group)

    def close(self) -> None:
        self.inner.close()


@dataclass
class Pair:
    """A host and a proxy joined by a socket pair, in this process."""

    bus: MemoryTransport
    real: Recording
    host: TransportHost
    proxy: ProxyTransport
    ends: list[bool] = field(default_factory=list)


@pytest.fixture
def pair() -> Iterator[Pair]:
    bus = MemoryTransport()
    real = Recording(bus)
    ours, theirs = socket.socketpair()
    ends: list[bool] = []
    host = TransportHost(real, Link(ours), on_end=ends.append).start()
    proxy = ProxyTransport(Link(theirs))

    def serve() -> None:
        proxy.serve()
        proxy.close()

    threading.Thread(target=serve, daemon=True).start()
    yield Pair(bus, real, host, proxy, ends)
    host.stop(timeout=5)
    proxy.close()
    bus.close()


def collect(into: list[Delivery], settle: str = "hold") -> Handler:
    """Return a handler that records deliveries and acks them when asked."""

    def handle(delivery: Delivery) -> None:
        into.append(delivery)
        if settle == "ack":
            delivery.ack()

    return handle


def test_subscribe_deliver_and_publish_round_trip(pair: Pair) -> None:
    got: list[Delivery] = []
    replies: list[bytes] = []
    pair.bus.subscribe("replies", lambda d: (replies.append(d.body), d.ack()))
    pair.proxy.subscribe("jobs/+", collect(got, "ack"))

    pair.bus.publish("jobs/a", b"payload")
    assert wait_until(lambda: len(got) == 1)
    pair.proxy.publish("replies", b"answer")

    assert (got[0].topic, got[0].body, got[0].redelivered) == ("jobs/a", b"payload", False)
    assert wait_until(lambda: replies == [b"answer"])


def test_the_broker_sees_the_ack_only_when_the_child_acks(pair: Pair) -> None:
    got: list[Delivery] = []
    pair.proxy.subscribe("jobs", collect(got))
    pair.bus.publish("jobs", b"1")
    pair.bus.publish("jobs", b"2")
    assert wait_until(lambda: len(got) == 2)
    time.sleep(0.05)

    held = [getattr(d, "settled", None) for d in pair.real.deliveries]
    got[1].ack()

    assert held == [None, None]
    assert wait_until(lambda: getattr(pair.real.deliveries[1], "settled", None) == "ack")
    assert getattr(pair.real.deliveries[0], "settled", None) is None
    assert pair.host.unsettled == 1


def test_nack_requeues_or_dead_letters_through_the_host(pair: Pair) -> None:
    got: list[Delivery] = []

    def handle(delivery: Delivery) -> None:
        got.append(delivery)
        if delivery.body == b"dead":
            delivery.nack(requeue=False)
        elif not delivery.redelivered:
            delivery.nack(requeue=True)
        else:
            delivery.ack()

    pair.proxy.subscribe("jobs", handle)
    pair.bus.publish("jobs", b"again")
    pair.bus.publish("jobs", b"dead")

    assert wait_until(lambda: len(got) == 3)
    assert [(d.body, d.redelivered) for d in got] == [
        (b"again", False),
        (b"dead", False),
        (b"again", True),
    ]
    assert wait_until(lambda: pair.bus.dead_letters == [("jobs", b"dead")])


def test_a_failing_handler_dead_letters_its_message(pair: Pair) -> None:
    def fail(delivery: Delivery) -> None:
        raise RuntimeError("boom")

    pair.proxy.subscribe("jobs", fail)
    pair.bus.publish("jobs", b"poison")

    assert wait_until(lambda: pair.bus.dead_letters == [("jobs", b"poison")])


def test_settling_twice_is_refused(pair: Pair) -> None:
    got: list[Delivery] = []
    pair.proxy.subscribe("jobs", collect(got, "ack"))
    pair.bus.publish("jobs", b"x")
    assert wait_until(lambda: len(got) == 1)

    with pytest.raises(TransportError, match="already settled"):
        got[0].nack()


def test_messages_reach_the_child_in_publish_order(pair: Pair) -> None:
    got: list[Delivery] = []
    pair.proxy.subscribe("jobs", collect(got, "ack"), group="workers")
    bodies = [str(i).encode() * 1000 for i in range(300)]
    for body in bodies:
        pair.bus.publish("jobs", body)

    assert wait_until(lambda: len(got) == len(bodies))
    assert [d.body for d in got] == bodies
    assert wait_until(lambda: pair.host.unsettled == 0)


def test_the_host_transports_errors_are_raised_in_the_child(pair: Pair) -> None:
    pair.real.fail_with = ConnectionLost("broker down")
    with pytest.raises(ConnectionLost, match="broker down"):
        pair.proxy.publish("t", b"x")
    pair.real.fail_with = ValueError("odd")
    with pytest.raises(TransportError, match="odd"):
        pair.proxy.publish("t", b"x")
    pair.bus.subscribe("a", lambda d: None, group="g")
    with pytest.raises(TransportError, match="bound to"):
        pair.proxy.subscribe("b", lambda d: None, group="g")


def test_cancel_stops_deliveries(pair: Pair) -> None:
    got: list[Delivery] = []
    sub = pair.proxy.subscribe("jobs", collect(got, "ack"))
    pair.bus.publish("jobs", b"1")
    assert wait_until(lambda: len(got) == 1)

    sub.cancel()
    pair.bus.publish("jobs", b"2")
    pair.bus.join(timeout=5)
    time.sleep(0.05)

    assert [d.body for d in got] == [b"1"]


def test_requests_fail_once_the_host_is_gone() -> None:
    ours, theirs = socket.socketpair()
    proxy = ProxyTransport(Link(theirs))
    ours.close()

    with pytest.raises(OffloadError):
        proxy.publish("t", b"x")
    assert proxy.serve() is False
    proxy.close()


# -- a real child process --------------------------------------------------------


def replies_to(bus: MemoryTransport) -> list[bytes]:
    """Subscribe to the echo target's replies."""
    replies: list[bytes] = []
    bus.subscribe("replies", lambda d: (replies.append(d.body), d.ack()))
    return replies


def test_a_child_process_handles_messages_and_stops_cleanly() -> None:
    bus = MemoryTransport()
    replies = replies_to(bus)
    child = OffloadedProcess(echo, {"topic": "jobs", "replies": "replies"})
    child.wait_booted(timeout=60).serve(bus, timeout=60)
    for body in (b"a", b"b", b"requeue", b"dead"):
        bus.publish("jobs", body)

    assert wait_until(lambda: len(replies) == 5, timeout=20)
    child.stop()

    pid = str(child.pid).encode()
    assert replies == [pid + b":" + b for b in (b"a", b"b", b"requeue", b"dead", b"requeue")]
    assert child.pid != os.getpid()
    assert bus.dead_letters == [("jobs", b"dead")]
    assert (child.failed, child.exitcode) == (False, 0)
    bus.close()


def test_a_dead_child_is_reported_and_leaves_its_message_unsettled() -> None:
    bus = MemoryTransport()
    real = Recording(bus)
    exited = threading.Event()
    child = OffloadedProcess(echo, {"topic": "jobs", "replies": "r"}, on_exit=exited.set)
    child.wait_booted(timeout=60).serve(real, timeout=60)

    bus.publish("jobs", b"exit")

    assert exited.wait(20)
    assert child.failed
    assert child.exitcode == 3
    assert [getattr(d, "settled", None) for d in real.deliveries] == [None]
    assert bus.dead_letters == []
    child.stop()
    bus.close()


def test_a_target_that_cannot_start_raises() -> None:
    bus = MemoryTransport()
    child = OffloadedProcess(broken)

    with pytest.raises(OffloadError, match="did not start"):
        child.wait_booted(timeout=60).serve(bus, timeout=60)
    assert child.exitcode == 1
    bus.close()


_PARENT = """
import sys, time
from broker import MemoryTransport
from broker.offload import OffloadedProcess
from tests.broker.offload_targets import echo
if __name__ == "__main__":
    child = OffloadedProcess(echo, {"topic": "jobs", "replies": "r"})
    child.wait_booted(timeout=60).serve(MemoryTransport(), timeout=60)
    print(child.pid, flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """Return whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_child_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_PARENT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, env=env, cwd=REPO
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)

        parent.send_signal(signal.SIGKILL)
        parent.wait(10)

        assert wait_until(lambda: not _alive(child), timeout=10)
    finally:
        parent.kill()
        parent.wait()


_UNGUARDED = """
from broker.offload import OffloadedProcess, OffloadError
from tests.broker.offload_targets import echo
# No `if __name__ == "__main__"`: the spawned child re-imports this file,
# fails to start a process of its own and exits before it boots.
try:
    OffloadedProcess(echo, {"topic": "jobs", "replies": "r"}).wait_booted(timeout=60)
except OffloadError as exc:
    print("refused:", exc, flush=True)
"""


def test_a_script_without_a_main_guard_gets_an_error_not_a_hang(tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(_UNGUARDED)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=REPO, timeout=90
    )

    assert "refused: the offloaded process did not boot" in out.stdout
    assert time.monotonic() - started < 45  # reported when the child died, not at the timeout
