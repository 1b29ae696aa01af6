"""Transport benchmark: round overhead, worker intake vs raw consume, memory per device.

Run ``python -m experiments.bench.transport`` (add ``--quick`` for a smoke run,
``--only intake`` to re-measure one part and keep the others' figures).
Writes ``experiments/results/bench_transport.{md,json}``. Needs RabbitMQ on
127.0.0.1:5672 and Mosquitto on 127.0.0.1:1883 (``make brokers``); the MQTT
intake runs on a private Mosquitto of its own when the binary is installed.
The intake compares the worker in-process with the worker offloaded to a
child process (``fedmq worker --processes 2``, ``broker.offload``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from aggregator_service import AggregatorWorker, ExperimentConfig
from broker import (
    Delivery,
    ModelRef,
    ModelUpdate,
    RoundCommitted,
    RoundOpened,
    TrainTask,
    Transport,
    decode,
    encode,
    encode_weights,
)
from broker.embedded import EmbeddedBroker, find_mosquitto
from broker.identity import SERVICE_NAME, Identity
from broker.messages import TaskGrant
from broker.offload import OffloadedProcess
from broker.topics import Topics
from broker.verify import issue_grant
from device_sdk import DeviceContext, TrainResult
from fedmq.compose import run_experiment
from fedmq.wiring import transport_factory, unique_client_id
from model_store import MemoryStore

BROKERS = {
    "amqp": "amqp://guest:guest@127.0.0.1:5672/%2F",
    "mqtt": "mqtt://127.0.0.1:1883",
}
RESULTS = Path(__file__).resolve().parents[1] / "results"
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


def hidden_for(params: int) -> int:
    """Return the MLP hidden width giving about ``params`` parameters on 64 inputs, 10 classes."""
    return max(1, (params - 10) // 75)


def noop_trainers(x: np.ndarray, y: np.ndarray, index: int) -> Any:
    """Trivial local work: hand the global weights straight back."""

    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        return TrainResult(ctx.weights, len(x), {"loss": 0.0})

    return train


def round_overhead(broker: str, devices: int, params: int, rounds: int) -> dict[str, Any]:
    """Return the median wall time of a round whose devices do no training."""
    config = ExperimentConfig.from_dict(
        {
            "name": "bench",
            "seed": 0,
            "model": {
                "zoo": "mlp",
                "input_shape": [64],
                "num_classes": 10,
                "hidden": [hidden_for(params)],
            },
            "data": {"dataset": "digits", "devices": devices, "partition": "iid"},
            "rounds": {"count": rounds, "devices_per_round": devices, "deadline_s": 600.0},
        }
    )
    result = run_experiment(
        config,
        broker_url=BROKERS[broker],
        timeout_s=900,
        make_trainer=noop_trainers,
        evaluate=False,
    )
    if broker == "amqp":
        _drop_run_queues()
    durations = [r.duration_s or 0.0 for r in result.rounds[1:]]  # round 1 warms caches
    return {
        "broker": broker,
        "devices": devices,
        "params": params,
        "round_s_median": statistics.median(durations),
        "round_s_max": max(durations),
        "uploads": result.fleet["uploads"],
    }


WORKERS = ("in-process", "offloaded")
"""How the intake bench runs the worker: in this process, or in a child (``--processes 2``)."""


def intake(
    broker: str, updates: int, params: int, *, url: str | None = None, flip: bool = False
) -> list[dict[str, Any]]:
    """Return one trial: each worker's folds/s and a plain consumer's msgs/s, same backlog.

    Every consumer starts against a queue already holding every frame, so the
    publisher's speed is out of the measurement: each figure is how fast one
    consumer empties a durable group queue (AMQP) or a resumed session (MQTT).
    The raw consumer runs first; ``flip`` runs the offloaded worker before the
    in-process one, so that alternating trials cancel a drifting machine.
    ``url`` overrides ``BROKERS[broker]`` (a private broker).
    """
    url = url or BROKERS[broker]
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
    raw_rate = _raw_consume_rate(broker, url, frames)
    rows = []
    for worker in reversed(WORKERS) if flip else WORKERS:
        rate = _worker_rate(broker, url, frames, blob, devices, experiment, worker, service)
        rows.append(
            {
                "broker": broker,
                "worker": worker,
                "updates": updates,
                "params": params,
                "bytes": len(frames[0]),
                "worker_folds_per_s": rate,
                "raw_consume_per_s": raw_rate,
                "ratio": rate / raw_rate,
            }
        )
    return sorted(rows, key=lambda row: WORKERS.index(row["worker"]))


def bench_worker(
    transport: Transport,
    *,
    blob: bytes,
    experiment: str,
    group: str,
    namespace: str,
    worker_name: str,
    worker_key: bytes,
    service_key: bytes,
) -> None:
    """Start a worker whose in-memory store holds ``blob`` as ``experiment``'s version 0.

    Module-level, with its keys as raw bytes, so that an offloaded worker can run
    it in its own process.
    """
    store = MemoryStore()
    artifacts = {"weights.safetensors": (blob, "application/octet-stream")}
    store.publish(experiment, 0, artifacts, parent=None)
    AggregatorWorker(
        transport,
        store,
        identity=Identity.from_private_bytes(worker_name, worker_key),
        service_key=service_key,
        topics=Topics(namespace),
        group=group,
    ).start()


def _worker_rate(
    broker: str,
    url: str,
    frames: list[bytes],
    blob: bytes,
    devices: tuple[str, ...],
    experiment: str,
    worker: str,
    service: Identity,
) -> float:
    """Return how fast a worker (in-process or offloaded) folds ``frames`` from a backlog."""
    open_transport = transport_factory(url, session_expiry_s=SESSION_S)
    group, worker_id = unique_client_id("bench-aggregators"), unique_client_id("worker")
    # A namespace of its own: no other deployment's traffic reaches this worker.
    topics = Topics(f"bench{uuid.uuid4().hex[:8]}")
    opened = RoundOpened(
        experiment_id=experiment,
        round=1,
        base_version=0,
        model=ModelRef("memory://", hashlib.sha256(blob).hexdigest(), len(blob)),
        selected=devices,
        target_reports=len(frames),
        min_reports=len(frames),
        deadline_at=0.0,
        strategy={"name": "fedavg"},
    )
    # An MQTT session keeps the worker's control subscription, so the announcement
    # can wait in it ahead of the updates; an AMQP control queue lives only while
    # its consumer does, so there the announcement follows the worker's start.
    announce_first = broker == "mqtt"
    announcement = encode(opened, service)
    _backlog(
        open_transport,
        worker_id,
        topics.all_updates,
        group,
        [(topics.updates(experiment, d), frame) for d, frame in zip(devices, frames, strict=True)],
        first=(topics.control(experiment), announcement) if announce_first else None,
        control=topics.all_control,
    )
    driver = open_transport(unique_client_id("driver"))
    committed = threading.Event()

    def on_event(delivery: Delivery) -> None:
        if isinstance(decode(delivery.body), RoundCommitted):
            committed.set()
        delivery.ack()

    driver.subscribe(topics.events(experiment), on_event)
    worker_identity = Identity.generate(worker_id)
    settings: dict[str, Any] = {
        "blob": blob,
        "experiment": experiment,
        "group": group,
        "namespace": topics.namespace,
        "worker_name": worker_identity.name,
        "worker_key": worker_identity.private_bytes(),
        "service_key": service.public_key,
    }
    offload = None
    if worker == "offloaded":
        # Booted (imports done) before the clock starts, as the in-process worker is.
        offload = OffloadedProcess(bench_worker, settings).wait_booted()
    start = time.perf_counter()
    worker_bus = open_transport(worker_id)  # resumes the session holding the backlog
    try:
        if offload is not None:
            offload.serve(worker_bus)
        else:
            bench_worker(worker_bus, **settings)
        if not announce_first:
            driver.publish(topics.control(experiment), announcement)
        if not committed.wait(600):
            raise TimeoutError(f"the {worker} worker did not commit the intake round")
        rate = len(frames) / (time.perf_counter() - start)
    finally:
        if offload is not None:
            offload.stop()
        for bus in (driver, worker_bus):
            bus.close()
        _drop_amqp_queue(broker, f"fedmq.group.{group}")
    return rate


def intake_rows(
    broker: str, updates: int, trials: int, url: str | None = None
) -> list[dict[str, Any]]:
    """Return one row per worker kind: the median of ``trials`` interleaved trials."""
    # Loopback rates on this VM swing 2x between runs: interleave trials, keep the median.
    runs = [intake(broker, updates, 100_000, url=url, flip=i % 2 == 1) for i in range(trials)]
    rows = []
    for kind in WORKERS:
        mine = [row for run in runs for row in run if row["worker"] == kind]
        keys = ("worker_folds_per_s", "raw_consume_per_s", "ratio")
        median = {key: statistics.median(row[key] for row in mine) for key in keys}
        spread = {
            "ratio_min": min(r["ratio"] for r in mine),
            "ratio_max": max(r["ratio"] for r in mine),
        }
        rows.append({**mine[0], **median, **spread, "trials": len(mine)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _backlog(
    open_transport: Any,
    client_id: str,
    pattern: str,
    group: str,
    frames: list[tuple[str, bytes]],
    first: tuple[str, bytes] | None = None,
    control: str | None = None,
) -> None:
    """Leave ``frames`` (topic, frame) queued for ``group`` while its consumer is offline.

    The consumer ``client_id`` subscribes to ``pattern`` in ``group``, as it will
    when it comes back. ``first``, a (topic, frame) published before the backlog,
    reaches a resumed MQTT session subscribed to ``control`` ahead of it, as a
    round's announcement precedes its updates.
    """
    holder = open_transport(client_id)
    holder.subscribe(pattern, lambda d: None, group=group)
    if first is not None and control is not None:
        holder.subscribe(control, lambda d: None)
    holder.close()
    publisher = open_transport(unique_client_id("pub"))
    if first is not None:
        publisher.publish(*first)
    for topic, frame in frames:
        publisher.publish(topic, frame)
    publisher.close()


def _raw_consume_rate(broker: str, url: str, frames: list[bytes]) -> float:
    """Return how fast a consumer that only acks drains ``frames`` from a backlog."""
    open_transport = transport_factory(url, session_expiry_s=SESSION_S)
    topic = f"bench/raw/{uuid.uuid4().hex[:8]}"
    group, client_id = f"bench-raw-{uuid.uuid4().hex[:6]}", unique_client_id("raw")
    _backlog(open_transport, client_id, topic, group, [(topic, frame) for frame in frames])
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
    _drop_amqp_queue(broker, f"fedmq.group.{group}")
    return rate


def _drop_amqp_queue(broker: str, name: str) -> None:
    """Delete a benchmark's group queue from RabbitMQ (a durable queue outlives the run)."""
    if broker != "amqp":
        return
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(BROKERS["amqp"]))
    connection.channel().queue_delete(name)
    connection.close()


def _drop_run_queues() -> None:
    """Delete the private aggregator queues in-process runs left on RabbitMQ."""
    listing = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "consumers"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for line in listing.splitlines():
        name, _, consumers = line.partition("\t")
        if name.startswith("fedmq.group.fedmq-aggregators-") and consumers.strip() == "0":
            _drop_amqp_queue("amqp", name)


_MEMORY_PROBE = """
import json, sys, time
from broker.identity import SERVICE_NAME, Identity
from fedmq.wiring import transport_factory
from device_sdk.emulator import Fleet
from experiments.bench.transport import noop_trainers
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
url, n = sys.argv[1], int(sys.argv[2])
open_transport = transport_factory(url)
data = {"dataset": "digits", "devices": max(n, 1), "partition": "iid"}
# No service here: each device pins a made-up service key and its own key pair.
service_key = Identity.generate(SERVICE_NAME).public_key
enroll = lambda identity, platform: service_key
Fleet(lambda _c, _w=None: None, data, seed=0, indices=range(0), make_trainer=noop_trainers,
      enroll=enroll)  # warm imports
time.sleep(0.5)
before = rss()
fleet = Fleet(open_transport, data, seed=0, indices=range(n), make_trainer=noop_trainers,
              prefix="mem" + str(int(time.time())), enroll=enroll)
fleet.start()
time.sleep(2.0)
print(json.dumps({"before": before, "after": rss()}))
"""


def memory_per_device(broker: str, devices: int) -> dict[str, Any]:
    """Return the resident memory one emulated device adds (connections included)."""
    url = BROKERS.get(broker, "memory://")
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, url, str(devices)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    sample = json.loads(out.stdout.strip().splitlines()[-1])
    per = (sample["after"] - sample["before"]) / devices
    return {"broker": broker, "devices": devices, "bytes_per_device": per}


PARTS = ("overhead", "intake", "memory")


def main() -> None:
    """Run the measurements and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--only",
        choices=PARTS,
        action="append",
        help="run only this part (repeatable); the others keep their figures from the last run",
    )
    parser.add_argument(
        "--trials", type=int, default=7, help="interleaved intake trials per broker (default 7)"
    )
    args = parser.parse_args()
    parts = args.only or PARTS
    sizes = (
        [(10, 100_000)]
        if args.quick
        else [(n, p) for p in (100_000, 4_000_000) for n in (10, 50, 100)]
    )
    saved = RESULTS / "bench_transport.json"
    results: dict[str, list[dict[str, Any]]] = {part: [] for part in PARTS}
    if args.only and saved.exists():
        results.update(json.loads(saved.read_text()))
    for part in parts:
        results[part] = []
    for broker in BROKERS:
        if "overhead" in parts:
            for devices, params in sizes:
                rounds = 4 if params <= 100_000 else 3
                row = round_overhead(broker, devices, params, rounds)
                print(json.dumps(row), flush=True)
                results["overhead"].append(row)
        if "intake" in parts:
            updates, trials = (50, 1) if args.quick else (500, args.trials)
            results["intake"] += isolated_intake_rows(broker, updates, trials)
    if "memory" in parts:
        for broker in ("memory", *BROKERS):
            row = memory_per_device(broker, 20 if args.quick else 100)
            print(json.dumps(row), flush=True)
            results["memory"].append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=2))
    (RESULTS / "bench_transport.md").write_text(render(results))
    print(render(results))


def isolated_intake_rows(broker: str, updates: int, trials: int) -> list[dict[str, Any]]:
    """Return ``intake_rows``, on a private Mosquitto for MQTT when one is installed.

    Every worker on a shared broker subscribes to every update topic: the
    bench's backlogs would reach other deployments' workers and the offline
    sessions they left, and their traffic would skew the bench. A private
    broker also lifts a stock Mosquitto's 1,000-message queue limit.
    """
    if broker != "mqtt" or find_mosquitto() is None:
        return intake_rows(broker, updates, trials)
    with EmbeddedBroker("mosquitto") as private:
        return [
            {**row, "private_broker": True}
            for row in intake_rows(broker, updates, trials, url=private.url)
        ]


def render(results: dict[str, list[dict[str, Any]]]) -> str:
    """Return the results as markdown tables."""
    lines = [
        "# Transport benchmark",
        "",
        "## Round overhead (no local training)",
        "",
        "| broker | devices | parameters | median round (s) | max round (s) | uploads |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['broker']} | {r['devices']} | {r['params']:,} | {r['round_s_median']:.3f} "
        f"| {r['round_s_max']:.3f} | {r['uploads']} |"
        for r in results["overhead"]
    ]
    lines += [
        "",
        "## Worker intake vs raw consume (same backlog of frames; median of trials)",
        "",
        "Worker `offloaded` is `fedmq worker --processes 2`: the worker in a child process,",
        "the broker connection in the parent."
        + (
            " MQTT rows ran on a private Mosquitto."
            if any(r.get("private_broker") for r in results["intake"])
            else ""
        ),
        "",
        "| broker | worker | updates | frame bytes | worker folds/s | raw consume msg/s | ratio "
        "| ratio range |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['broker']} | {r.get('worker', 'in-process')} | {r['updates']} | {r['bytes']:,} "
        f"| {r['worker_folds_per_s']:.0f} | {r['raw_consume_per_s']:.0f} | {r['ratio']:.2f} "
        f"| {r.get('ratio_min', r['ratio']):.2f}-{r.get('ratio_max', r['ratio']):.2f} |"
        for r in results["intake"]
    ]
    lines += [
        "",
        "## Memory per emulated device (beyond model and data)",
        "",
        "| transport | devices | KiB per device |",
        "| --- | ---: | ---: |",
    ]
    lines += [
        f"| {r['broker']} | {r['devices']} | {r['bytes_per_device'] / 1024:.0f} |"
        for r in results["memory"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
