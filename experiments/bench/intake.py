"""Worker intake vs raw consume: one round's backlog through 1, 2 and 4 worker processes.

Part of ``python -m experiments.bench.transport`` (``--only intake``). Every
consumer starts against a backlog already queued, so the publisher is out of
the measurement; the bench plays the coordinator (``RoundClosing``) and the
workers checkpoint to a shared ``LocalStore``, so a figure runs from the
backlog to the committed version.

Brokers: ``amqp`` (the shared RabbitMQ), ``mqtt`` (a private Mosquitto when
installed, else the shared one), ``rabbitmq-mqtt``: devices publish over MQTT
to a RabbitMQ's MQTT plugin and the consumers read over MQTT from the same
node, at a URL the caller gives (``RABBITMQ_MQTT``), and ``rabbitmq-mqtt+amqp``:
the same devices, the consumers on that node's AMQP listener (the production
shape: phones on MQTT, workers on AMQP work queues).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import queue
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

from aggregator_service import AggregatorWorker
from aggregator_service.checkpoints import Checkpoints
from aggregator_service.rounds.closing import RoundClosing
from broker import (
    Delivery,
    Message,
    ModelRef,
    ModelUpdate,
    PartialReady,
    RoundAbandoned,
    RoundCommitted,
    RoundOpened,
    RoundProgress,
    StrategySpec,
    Transport,
    decode,
    encode,
    encode_weights,
)
from broker.embedded import EmbeddedBroker, find_mosquitto
from broker.identity import SERVICE_NAME, Identity
from broker.messages import TaskGrant
from broker.topics import Topics
from broker.transport import Handler, ReconnectListener, Subscription
from broker.verify import issue_grant
from fedmq.wiring import Ticker, transport_factory, unique_client_id
from model_store import LocalStore

BROKERS = {
    "amqp": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "mqtt": "mqtt://127.0.0.1:1883",
}
RABBITMQ_MQTT = "rabbitmq-mqtt"
"""A RabbitMQ's MQTT plugin: no default URL, the shared RabbitMQ must not be changed.

Its node needs ``mqtt.prefetch`` above the workers' checkpoint interval (the
shipped ``deploy/rabbitmq/rabbitmq.conf`` has 1000; at the plugin's default of 10
a worker, which acks at its checkpoints, stalls until the round's deadline) and, when
``mqtt.exchange`` names an exchange (the shipped ``fedmq``), that exchange
(any FedMQ AMQP client declares it). Debian's 3.10 speaks MQTT 3.1.1 only:
give the URL ``?protocol=3.1.1``.
"""
RABBITMQ_MQTT_AMQP = "rabbitmq-mqtt+amqp"
"""Devices on a RabbitMQ's MQTT plugin, consumers on the same node's AMQP listener.

The plugin must publish to FedMQ's exchange (``mqtt.exchange = fedmq``, as shipped)."""
SESSION_S = 120
"""MQTT sessions of bench consumers outlive them this long, not an hour: an offline
session subscribed to every update would queue a copy of each later trial's backlog."""


def signed_update(
    service: Identity, device: Identity, experiment: str, blob: bytes, task_id: str
) -> bytes:
    """Return ``device``'s signed update of ``blob``, carrying the service's grant of its task."""
    grant = TaskGrant(
        experiment_id=experiment,
        round=1,
        device_id=device.name,
        task_id=task_id,
        public_key=device.public_key_text,
        max_examples=1,
    )
    update = ModelUpdate(
        experiment_id=experiment,
        round=1,
        device_id=device.name,
        base_version=0,
        task_id=task_id,
        num_examples=1,
        inline_weights=blob,
        grant=issue_grant(grant, service),
    )
    return encode(update, device)


WORKERS = ("1 worker", "2 workers", "4 workers")
"""How the intake bench runs the workers: one in this process; two or four worker
processes, each with its own connection and name."""
WORKER_COUNT = {"1 worker": 1, "2 workers": 2, "4 workers": 4}
AMQP_PREFETCH = 64
"""Unacked frames RabbitMQ hands each intake consumer ahead (URL ``prefetch``; default 1000).

Twice the worker's checkpoint interval (32 folds), so a worker never waits on
its own acks. At the default, the first consumer to subscribe takes most of a
backlog before the others subscribe (300 frames of 400 kB: 200/100 over two
consumers, 200/100/0/0 over four), so added workers would have nothing to do.
"""


def _opener(url: str) -> Callable[[str], Transport]:
    """Return ``open(client_id)`` for the bench's consumers (short MQTT sessions)."""
    open_transport = transport_factory(url, session_expiry_s=SESSION_S)
    return lambda client_id: open_transport(client_id, None, None)


def intake_url(broker: str) -> str:
    """Return the URL the intake bench's consumers use on the shared ``broker``."""
    if broker == "amqp":
        return f"{BROKERS['amqp']}?prefetch={AMQP_PREFETCH}"
    return BROKERS[broker]


def over_mqtt(url: str) -> bool:
    """Return whether ``url`` names an MQTT broker (sessions hold a backlog, no gating)."""
    return urlsplit(url).scheme in ("mqtt", "mqtts")


def shares_groups(url: str) -> bool:
    """Return whether worker processes at ``url`` compete for one group's messages.

    MQTT 3.1.1 has no shared subscriptions: each worker's session would get
    every update (RabbitMQ 3.10's MQTT plugin speaks nothing newer).
    """
    protocol = parse_qs(urlsplit(url).query).get("protocol", ["5"])[-1]
    return not over_mqtt(url) or protocol != "3.1.1"


def worker_variants(url: str, workers: tuple[str, ...] = WORKERS) -> tuple[str, ...]:
    """Return the variants of ``workers`` that can run at ``url`` (one worker where none share)."""
    if shares_groups(url):
        return workers
    return tuple(w for w in workers if WORKER_COUNT[w] == 1)


def intake(
    broker: str,
    updates: int,
    params: int,
    *,
    url: str | None = None,
    flip: bool = False,
    workers: tuple[str, ...] = WORKERS,
    devices_url: str | None = None,
) -> list[dict[str, Any]]:
    """Return one trial: each worker variant's folds/s and a plain consumer's msgs/s, same backlog.

    Every consumer starts against a queue already holding every frame, so the
    publisher's speed is out of the measurement: each figure is how fast the
    workers empty a durable group queue (AMQP) or their resumed sessions (MQTT)
    and commit the round, the bench acting as the coordinator that closes the
    round and has one worker combine it. The raw consumer runs first; ``flip``
    runs the variants in reverse order, so that alternating trials cancel a
    drifting machine. ``url`` overrides ``intake_url(broker)`` (a private broker);
    variants that cannot run there (several workers without shared groups) are left out.
    ``devices_url`` is where the frames are published, when not at ``url``.
    """
    url = url or intake_url(broker)
    devices_url = devices_url or url
    workers = worker_variants(url, workers)
    weights = {"w": np.random.default_rng(0).normal(size=params).astype(np.float32)}
    blob = encode_weights(weights)
    devices = tuple(f"d{i:05d}" for i in range(updates))
    experiment = f"bench{uuid.uuid4().hex[:6]}"
    # Signed as on a real deployment: each update by its device's own key, carrying
    # the service's grant, so the worker's intake includes verifying both.
    service = Identity.generate(SERVICE_NAME)
    frames = [
        signed_update(service, Identity.generate(d), experiment, blob, f"t-{d}") for d in devices
    ]
    raw_rate = _raw_consume_rate(url, devices_url, frames)
    rows = []
    for worker in reversed(workers) if flip else workers:
        rate, shares = _worker_rate(
            (url, devices_url), frames, blob, devices, experiment, worker, service
        )
        rows.append(
            {
                "broker": broker,
                "worker": worker,
                "workers": WORKER_COUNT[worker],
                "updates": updates,
                "params": params,
                "bytes": len(frames[0]),
                "worker_folds_per_s": rate,
                "raw_consume_per_s": raw_rate,
                "ratio": rate / raw_rate,
                "shares": shares,
                "largest_share": shares[0] / updates,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return sorted(rows, key=lambda row: WORKERS.index(row["worker"]))


def bench_worker(
    transport: Transport,
    *,
    store_root: str,
    group: str,
    namespace: str,
    worker_name: str,
    worker_key: bytes,
    service_key: bytes,
) -> None:
    """Start a worker on the shared model store in ``store_root`` (version 0 already there).

    Module-level, with its keys as raw bytes, so that a worker process can run it.
    """
    AggregatorWorker(
        transport,
        LocalStore(store_root),
        identity=Identity.from_private_bytes(worker_name, worker_key),
        service_key=service_key,
        topics=Topics(namespace),
        group=group,
    ).start()


class _Held:
    """A subscription ``_Gated`` holds back until it opens."""

    def __init__(self, transport: Transport, topic: str, handler: Handler, group: str) -> None:
        self._transport = transport
        self._args = (topic, handler, group)
        self._subscription: Subscription | None = None
        self._cancelled = False

    def open(self) -> None:
        if not self._cancelled and self._subscription is None:
            topic, handler, group = self._args
            self._subscription = self._transport.subscribe(topic, handler, group=group)

    def cancel(self) -> None:
        self._cancelled = True
        if self._subscription is not None:
            self._subscription.cancel()


class _Gated:
    """A transport whose subscriptions in ``group`` wait for ``open``; the rest pass through.

    An AMQP worker can so connect, subscribe to round control and take the
    round's announcement before the clock starts, and consume the backlog of
    its update group only from ``open``.
    """

    def __init__(self, transport: Transport, group: str) -> None:
        self._transport = transport
        self._group = group
        self._held: list[_Held] = []

    def publish(self, topic: str, body: bytes) -> None:
        self._transport.publish(topic, body)

    def subscribe(self, topic: str, handler: Handler, *, group: str | None = None) -> Subscription:
        if group != self._group:
            return self._transport.subscribe(topic, handler, group=group)
        held = _Held(self._transport, topic, handler, group)
        self._held.append(held)
        return held

    def open(self) -> None:
        for held in self._held:
            held.open()

    def on_reconnect(self, listener: ReconnectListener) -> None:
        self._transport.on_reconnect(listener)

    def close(self) -> None:
        self._transport.close()


class _Coordinator:
    """The coordinator's part in the intake round: ``RoundClosing`` over the bench's transport.

    Announces the round, counts the workers' progress, closes the round once
    every update is in, and asks one worker to combine it when every partial
    is ready; ``shares`` holds the updates each worker accepted.
    """

    def __init__(
        self,
        transport: Transport,
        topics: Topics,
        experiment: str,
        service: Identity,
        store: LocalStore,
    ) -> None:
        self.outcome: RoundCommitted | RoundAbandoned | None = None
        self.ended = threading.Event()
        self.shares: dict[str, set[str]] = {}
        self._transport = transport
        self._service = service
        self._lock = threading.Lock()
        self._closing = RoundClosing(self._publish, topics, roster=Checkpoints(store).roster)
        transport.subscribe(topics.events(experiment), self._on_event)
        self._ticker = Ticker(self._tick).start()

    def open(self, opened: RoundOpened) -> None:
        """Announce ``opened`` (and repeat it, then the close and combine, as they fall due)."""
        with self._lock:
            self._closing.track(opened, asynchronous=False)

    def wait(self, timeout: float, check: Callable[[], None]) -> RoundCommitted:
        """Wait for the round's commit, calling ``check`` (raises if a worker died) meanwhile."""
        deadline = time.monotonic() + timeout
        while not self.ended.wait(0.2):
            check()
            if time.monotonic() > deadline:
                raise TimeoutError("the workers did not commit the intake round")
        if not isinstance(self.outcome, RoundCommitted):
            assert isinstance(self.outcome, RoundAbandoned)
            raise RuntimeError(f"the intake round was abandoned: {self.outcome.reason}")
        return self.outcome

    def close(self) -> None:
        """Stop repeating the round's messages."""
        self._ticker.stop()

    def _tick(self) -> None:
        with self._lock:
            self._closing.tick()

    def _publish(self, topic: str, message: Message) -> None:
        self._transport.publish(topic, encode(message, self._service))

    def _on_event(self, delivery: Delivery) -> None:
        message = decode(delivery.body)
        with self._lock:
            if isinstance(message, RoundProgress):
                self.shares.setdefault(message.sender, set()).update(message.accepted)
                self._closing.progress(message)
            elif isinstance(message, PartialReady):
                self._closing.ready(message)
            elif isinstance(message, RoundCommitted | RoundAbandoned):
                self._closing.ended(message.experiment_id, message.round)
                self.outcome = message
                self.ended.set()
        delivery.ack()


class _ParentHeld:
    """One worker in this process.

    ``boot`` runs before the clock: when ``gated`` (AMQP), the worker connects
    and subscribes with its update group held back. ``go`` starts the intake:
    it opens the group, or (MQTT) connects, which resumes the session holding
    the backlog.
    """

    def __init__(
        self,
        open_transport: Callable[[str], Transport],
        settings: dict[str, Any],
        *,
        gated: bool,
    ) -> None:
        self._open_transport = open_transport
        self._settings = settings
        self._gated = gated
        self._bus: Transport | None = None
        self._gate: _Gated | None = None

    def boot(self) -> None:
        if self._gated:
            self._bus = self._open_transport(self._settings["worker_name"])
            self._gate = _Gated(self._bus, self._settings["group"])
            self._start(self._gate)

    def go(self) -> None:
        if self._gate is not None:
            self._gate.open()
            return
        self._bus = self._open_transport(self._settings["worker_name"])
        self._start(self._bus)

    def _start(self, transport: Transport) -> None:
        bench_worker(transport, **self._settings)

    def check(self) -> None:
        """Nothing to check: the worker lives in this process."""

    def stop(self) -> None:
        if self._bus is not None:
            self._bus.close()


class _Spawned:
    """Worker processes of their own (spawned), each with its own connection and name.

    ``boot`` starts them and waits until each has imported everything and, when
    ``gated`` (AMQP), connected and subscribed with its update group held back;
    ``go`` lets them all start the intake at once.
    """

    def __init__(self, url: str, settings: list[dict[str, Any]], *, gated: bool) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._status: multiprocessing.queues.Queue[tuple[str, str]] = context.Queue()
        self._go = context.Event()
        self._stop = context.Event()
        self._processes = [
            context.Process(
                target=_worker_process,
                args=(url, mine, gated, self._status, self._go, self._stop),
                name=mine["worker_name"],
                daemon=True,
            )
            for mine in settings
        ]

    def boot(self, timeout: float = 120.0) -> None:
        for process in self._processes:
            process.start()
        deadline = time.monotonic() + timeout
        for _ in self._processes:
            try:
                name, error = self._status.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError("a worker process did not boot") from None
            if error:
                raise RuntimeError(f"worker process {name} failed: {error}")

    def go(self) -> None:
        self._go.set()

    def check(self) -> None:
        with contextlib.suppress(queue.Empty):
            name, error = self._status.get_nowait()
            raise RuntimeError(f"worker process {name} failed: {error}")
        for process in self._processes:
            if process.exitcode is not None:
                raise RuntimeError(f"worker process {process.name} exited ({process.exitcode})")

    def stop(self) -> None:
        self._stop.set()
        for process in self._processes:
            if process.pid is None:
                continue  # never started
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        self._status.close()


def _worker_process(
    url: str,
    settings: dict[str, Any],
    gated: bool,
    status: multiprocessing.queues.Queue[tuple[str, str]],
    go: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
) -> None:
    """Run one spawned worker: boot, report, start the intake at ``go``, end at ``stop``."""
    name = settings["worker_name"]
    open_transport = _opener(url)
    bus: Transport | None = None
    try:
        gate = None
        if gated:
            bus = open_transport(name)
            gate = _Gated(bus, settings["group"])
            bench_worker(gate, **settings)
        status.put((name, ""))
        if not _wait_for(go, stop):
            return
        if gate is not None:
            gate.open()
        else:
            bus = open_transport(name)  # resumes the session holding its share of the backlog
            bench_worker(bus, **settings)
        _wait_for(stop, stop)
    except Exception as exc:
        status.put((name, f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        if bus is not None:
            bus.close()


def _wait_for(
    event: multiprocessing.synchronize.Event, stop: multiprocessing.synchronize.Event
) -> bool:
    """Wait for ``event``; return False if ``stop`` came first or the bench's process died."""
    parent = multiprocessing.parent_process()
    while not event.wait(0.5):
        if stop.is_set() or (parent is not None and not parent.is_alive()):
            return False
    return True


def _worker_rate(
    urls: tuple[str, str],
    frames: list[bytes],
    blob: bytes,
    devices: tuple[str, ...],
    experiment: str,
    worker: str,
    service: Identity,
) -> tuple[float, list[int]]:
    """Return how fast a worker variant folds and commits ``frames`` from a backlog.

    Also returns how many updates each worker accepted, largest first. The
    clock runs from the workers' start on the backlog to the ``RoundCommitted``.
    ``urls`` are the consumers' broker and the devices' (often the same).
    """
    url, devices_url = urls
    open_transport = _opener(url)
    open_device = _opener(devices_url)
    group = unique_client_id("bench-aggregators")
    names = [unique_client_id("worker") for _ in range(WORKER_COUNT[worker])]
    # A namespace of its own: no other deployment's traffic reaches these workers.
    topics = Topics(f"bench{uuid.uuid4().hex[:8]}")
    sha256 = hashlib.sha256(blob).hexdigest()
    # An MQTT session keeps its subscriptions while its client is away: each
    # worker's session gets the announcement ahead of its share of the updates
    # (Mosquitto deals a shared subscription's messages round-robin to its
    # sessions, offline ones included). An AMQP control queue lives only while
    # its consumer does: there each worker subscribes, update group held back,
    # and the announcement follows.
    gated = not over_mqtt(url)
    updates = [
        (topics.updates(experiment, d), frame) for d, frame in zip(devices, frames, strict=True)
    ]
    with contextlib.ExitStack() as cleanup:  # undone in reverse: workers first, store last
        # A store the workers share: each checkpoints its share there, the combiner
        # reads them all, and the coordinator reads the round's roster.
        folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fedmq-bench-store-"))
        store = LocalStore(folder)
        artifacts = {"weights.safetensors": (blob, "application/octet-stream")}
        store.publish(experiment, 0, artifacts, parent=None)
        for queue_group in (group, Topics.combiners_group(group)):
            cleanup.callback(drop_amqp_queue, url, f"fedmq.group.{queue_group}")
        opened = RoundOpened(
            experiment_id=experiment,
            round=1,
            base_version=0,
            model=ModelRef(store.blob_url(sha256), sha256, len(blob)),
            selected=devices,
            target_reports=len(frames),
            min_reports=len(frames),
            deadline_at=time.time() + 3600,
            strategy=StrategySpec("fedavg"),
        )
        settings = []
        for name in names:
            identity = Identity.generate(name)
            settings.append(
                {
                    "store_root": folder,
                    "group": group,
                    "namespace": topics.namespace,
                    "worker_name": name,
                    "worker_key": identity.private_bytes(),
                    "service_key": service.public_key,
                }
            )
        driver = open_transport(unique_client_id("driver"))
        cleanup.callback(driver.close)
        coordinator = _Coordinator(driver, topics, experiment, service, store)
        cleanup.callback(coordinator.close)
        workers: _ParentHeld | _Spawned
        if worker == "1 worker":
            workers = _ParentHeld(open_transport, settings[0], gated=gated)
        else:
            workers = _Spawned(url, settings, gated=gated)
        cleanup.callback(workers.stop)
        if gated:
            holder = [unique_client_id("holder")]
            _backlog(open_transport, holder, topics.all_updates, group, updates, open_device)
            workers.boot()
            coordinator.open(opened)
        else:
            _backlog(
                open_transport,
                names,
                topics.all_updates,
                group,
                updates,
                open_device,
                control=topics.all_control,
                before=lambda: coordinator.open(opened),
            )
            workers.boot()
        start = time.perf_counter()
        workers.go()
        committed = coordinator.wait(600, workers.check)
        rate = len(frames) / (time.perf_counter() - start)
        if len(committed.accepted) != len(frames):
            raise RuntimeError(f"the round committed {len(committed.accepted)} of {len(frames)}")
        shares = sorted((len(accepted) for accepted in coordinator.shares.values()), reverse=True)
    return rate, shares + [0] * (len(names) - len(shares))


def intake_rows(
    broker: str,
    updates: int,
    trials: int,
    url: str | None = None,
    devices_url: str | None = None,
) -> list[dict[str, Any]]:
    """Return one row per worker variant: the median of ``trials`` interleaved trials."""
    # Loopback rates on this VM swing 2x between runs: interleave trials, keep the median.
    runs = [
        intake(broker, updates, 100_000, url=url, flip=i % 2 == 1, devices_url=devices_url)
        for i in range(trials)
    ]
    rows = []
    for kind in WORKERS:
        mine = [row for run in runs for row in run if row["worker"] == kind]
        if not mine:
            continue  # not possible on this broker (see ``worker_variants``)
        keys = ("worker_folds_per_s", "raw_consume_per_s", "ratio", "largest_share")
        median = {key: statistics.median(row[key] for row in mine) for key in keys}
        spread = {
            "ratio_min": min(r["ratio"] for r in mine),
            "ratio_max": max(r["ratio"] for r in mine),
            "shares": [r["shares"] for r in mine],
        }
        rows.append({**mine[0], **median, **spread, "trials": len(mine)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _backlog(
    open_transport: Callable[[str], Transport],
    client_ids: list[str],
    pattern: str,
    group: str,
    frames: list[tuple[str, bytes]],
    open_device: Callable[[str], Transport] | None = None,
    *,
    control: str | None = None,
    before: Callable[[], None] | None = None,
) -> None:
    """Leave ``frames`` (topic, frame) queued for ``group`` while its consumers are offline.

    Each consumer of ``client_ids`` subscribes to ``pattern`` in ``group``, as
    it will when it comes back (AMQP: one will do, the group's queue is shared;
    MQTT: one session per future consumer), and to ``control`` if given.
    ``before`` runs once they have: what it publishes on ``control`` reaches
    each resumed MQTT session ahead of the backlog, as a round's announcement
    precedes its updates. The frames go out through ``open_device`` (the
    devices' broker; default ``open_transport``).
    """
    for client_id in client_ids:
        holder = open_transport(client_id)
        holder.subscribe(pattern, lambda d: None, group=group)
        if control is not None:
            holder.subscribe(control, lambda d: None)
        holder.close()
    if before is not None:
        before()
    publisher = (open_device or open_transport)(unique_client_id("pub"))
    for topic, frame in frames:
        publisher.publish(topic, frame)
    publisher.close()


def _raw_consume_rate(url: str, devices_url: str, frames: list[bytes]) -> float:
    """Return how fast a consumer at ``url`` that only acks drains ``frames`` from a backlog."""
    open_transport = _opener(url)
    topic = f"bench/raw/{uuid.uuid4().hex[:8]}"
    group, client_id = f"bench-raw-{uuid.uuid4().hex[:6]}", unique_client_id("raw")
    backlog = [(topic, frame) for frame in frames]
    _backlog(open_transport, [client_id], topic, group, backlog, _opener(devices_url))
    got = threading.Event()
    count = [0]

    def consume(delivery: Delivery) -> None:
        delivery.ack()
        count[0] += 1
        if count[0] == len(frames):
            got.set()

    start = time.perf_counter()
    consumer = open_transport(client_id)
    consumer.subscribe(topic, consume, group=group)
    if not got.wait(600):
        raise TimeoutError("raw consumer did not receive every frame")
    rate = len(frames) / (time.perf_counter() - start)
    consumer.close()
    drop_amqp_queue(url, f"fedmq.group.{group}")
    return rate


def drop_amqp_queue(url: str, name: str) -> None:
    """Delete a benchmark's group queue from the RabbitMQ at ``url`` (it outlives the run).

    Nothing to do for an MQTT ``url``: its sessions expire (``SESSION_S``).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        return
    import pika

    plain = parts._replace(query="").geturl()  # FedMQ's own options are not pika's
    connection = pika.BlockingConnection(pika.URLParameters(plain))
    connection.channel().queue_delete(name)
    connection.close()


def isolated_intake_rows(
    broker: str,
    updates: int,
    trials: int,
    url: str | None = None,
    devices_url: str | None = None,
) -> list[dict[str, Any]]:
    """Return ``intake_rows``, on a private Mosquitto for MQTT when one is installed.

    Every worker on a shared broker subscribes to every update topic: the
    bench's backlogs would reach other deployments' workers and the offline
    sessions they left, and their traffic would skew the bench. A private
    broker also lifts a stock Mosquitto's 1,000-message queue limit. The
    RabbitMQ MQTT rows need their node's URLs: ``url`` for the consumers
    (``rabbitmq-mqtt``: its mqtt:// URL; ``rabbitmq-mqtt+amqp``: its amqp://
    URL) and, for the latter, ``devices_url`` (its mqtt:// URL).
    """
    if broker in (RABBITMQ_MQTT, RABBITMQ_MQTT_AMQP):
        if url is None or (broker == RABBITMQ_MQTT_AMQP and devices_url is None):
            raise ValueError(f"{broker} has no default broker: give its node's URLs")
        return intake_rows(broker, updates, trials, url=url, devices_url=devices_url)
    if broker != "mqtt" or find_mosquitto() is None:
        return intake_rows(broker, updates, trials)
    with EmbeddedBroker("mosquitto") as private:
        return [
            {**row, "private_broker": True}
            for row in intake_rows(broker, updates, trials, url=private.url)
        ]
