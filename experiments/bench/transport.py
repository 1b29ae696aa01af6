"""Transport benchmark: round overhead, worker intake vs raw consume, memory per device.

Run ``python -m experiments.bench.transport`` (add ``--quick`` for a smoke run,
``--only intake`` to re-measure one part and keep the others' figures,
``--out DIR`` to write the tables elsewhere). Writes
``experiments/results/bench_transport.{md,json}``. Needs RabbitMQ on
127.0.0.1:5672 and Mosquitto on 127.0.0.1:1883 (``make brokers``); the MQTT
intake runs on a private Mosquitto of its own when the binary is installed.
``--rabbitmq-mqtt mqtt://USER:PW@HOST:PORT?protocol=3.1.1`` adds intake rows
for a RabbitMQ's MQTT plugin (a node of its own: see ``RABBITMQ_MQTT`` in
``experiments.bench.intake`` for what it needs); without it they are skipped.
``--rabbitmq-amqp amqp://USER:PW@HOST:PORT/%2F`` (the same node) adds the
production shape: devices on its MQTT plugin, 1, 2 and 4 workers on AMQP.
The intake part lives in ``experiments.bench.intake``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from aggregator_service import ExperimentConfig
from broker import (
    TrainTask,
    connect,
)
from broker.connect import with_query
from device_sdk import DeviceContext, TrainResult
from experiments.bench.intake import (
    AMQP_PREFETCH,
    BROKERS,
    RABBITMQ_MQTT,
    RABBITMQ_MQTT_AMQP,
    drop_amqp_queue,
    isolated_intake_rows,
)
from fedmq.compose import run_experiment

RESULTS = Path(__file__).resolve().parents[1] / "results"


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
            drop_amqp_queue(BROKERS["amqp"], name)


_MEMORY_PROBE = """
import json, sys, time
from broker.identity import SERVICE_NAME, Identity
from device_sdk.emulator import Fleet
from device_sdk.emulator.fleet import fleet_transports
from experiments.bench.transport import noop_trainers
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
url, n = sys.argv[1], int(sys.argv[2])
# As `fedmq fleet` opens them: over MQTT every device is a client of one hub.
open_transport = fleet_transports(url, devices=n)
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
    parser.add_argument(
        "--rabbitmq-mqtt",
        metavar="URL",
        help="intake also through this RabbitMQ MQTT plugin, e.g. "
        "mqtt://USER:PW@127.0.0.1:PORT?protocol=3.1.1 (a node of its own, never the shared one)",
    )
    parser.add_argument(
        "--rabbitmq-amqp",
        metavar="URL",
        help="with --rabbitmq-mqtt: the same node's amqp:// URL, for rows with the devices on "
        "its MQTT plugin and the workers on AMQP (it also declares the fedmq exchange the "
        "shipped mqtt.exchange names)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="folder for bench_transport.{md,json} (default experiments/results)",
    )
    args = parser.parse_args()
    if args.rabbitmq_amqp and not args.rabbitmq_mqtt:
        parser.error("--rabbitmq-amqp needs --rabbitmq-mqtt (the same node's MQTT listener)")
    parts = args.only or PARTS
    sizes = (
        [(10, 100_000)]
        if args.quick
        else [(n, p) for p in (100_000, 4_000_000) for n in (10, 50, 100)]
    )
    saved = args.out / "bench_transport.json"
    results: dict[str, list[dict[str, Any]]] = {part: [] for part in PARTS}
    # The parts not re-measured keep their figures: from --out's last run, else the results'.
    previous = saved if saved.exists() else RESULTS / "bench_transport.json"
    if args.only and previous.exists():
        results.update(json.loads(previous.read_text()))
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
    if "intake" in parts and args.rabbitmq_mqtt:
        updates, trials = (50, 1) if args.quick else (500, args.trials)
        if args.rabbitmq_amqp:
            # An AMQP client declares FedMQ's exchange, where the plugin publishes.
            connect(args.rabbitmq_amqp).close()
        results["intake"] += isolated_intake_rows(
            RABBITMQ_MQTT, updates, trials, url=args.rabbitmq_mqtt
        )
        if args.rabbitmq_amqp:
            consumers = with_query(args.rabbitmq_amqp, prefetch=str(AMQP_PREFETCH))
            results["intake"] += isolated_intake_rows(
                RABBITMQ_MQTT_AMQP, updates, trials, url=consumers, devices_url=args.rabbitmq_mqtt
            )
    if "memory" in parts:
        for broker in ("memory", *BROKERS):
            row = memory_per_device(broker, 20 if args.quick else 100)
            print(json.dumps(row), flush=True)
            results["memory"].append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(results, indent=2))
    (args.out / "bench_transport.md").write_text(render(results))
    print(render(results))


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
        "From the workers' start on a round's backlog to its `RoundCommitted`: the bench is",
        "the coordinator (`RoundClosing`: it closes the round once every update is counted,",
        "then one worker combines the partials), and the workers checkpoint every 32 folds",
        "to a shared `LocalStore` on disk. Worker `1 worker` runs in the bench's process;",
        "`2 workers` and `4 workers` are that many worker",
        "processes, each with its own connection and name, in one group. AMQP workers",
        f"compete on the group queue (prefetch {AMQP_PREFETCH}); on MQTT, Mosquitto deals the",
        "backlog round-robin to the workers' sessions. Largest share: the most updates one",
        "worker folded, as a fraction of the round."
        + (
            " MQTT rows ran on a private Mosquitto."
            if any(r.get("private_broker") for r in results["intake"])
            else ""
        )
        + (
            " `rabbitmq-mqtt`: devices publish to a RabbitMQ's MQTT plugin (3.1.1) and the"
            " consumers read over MQTT from the same node; MQTT 3.1.1 has no shared"
            " subscriptions, so each worker would get every update: one worker only."
            if any(r["broker"] == RABBITMQ_MQTT for r in results["intake"])
            else ""
        )
        + (
            " `rabbitmq-mqtt+amqp`: the same devices, the consumers on that node's AMQP"
            f" listener (prefetch {AMQP_PREFETCH}): phones on MQTT, workers on AMQP."
            if any(r["broker"] == RABBITMQ_MQTT_AMQP for r in results["intake"])
            else ""
        ),
        "",
        "| broker | worker | updates | frame bytes | worker folds/s | raw consume msg/s | ratio "
        "| ratio range | largest share |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['broker']} | {r.get('worker', '1 worker')} | {r['updates']} | {r['bytes']:,} "
        f"| {r['worker_folds_per_s']:.0f} | {r['raw_consume_per_s']:.0f} | {r['ratio']:.2f} "
        f"| {r.get('ratio_min', r['ratio']):.2f}-{r.get('ratio_max', r['ratio']):.2f} "
        f"| {r.get('largest_share', 1.0):.0%} |"
        for r in results["intake"]
    ]
    lines += [
        "",
        "## Memory per emulated device (beyond model and data)",
        "",
        "Transports opened as `fedmq fleet` opens them: over MQTT every device is a client"
        " of one hub, whose fixed cost is spread over only this many devices"
        " (`experiments.bench.fleet_memory`, 1,000 devices: about 24 KiB each); AMQP and"
        " the in-process bus give each device a transport of its own.",
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
