"""The `fedmq` command."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from aggregator_service import ConfigError, ExperimentConfig, ServiceError, load_config
from aggregator_service.persistence import RoundRecord
from broker import BrokerError, topics
from broker.embedded import EmbeddedBroker
from device_sdk import DeviceError
from device_sdk.data.errors import DataError
from fedmq.compose import RunResult, run_experiment
from fedmq.defaults import DEMO_CONFIG
from fedmq.processes import run_fleet, run_server, run_worker
from fedmq.results import round_row, write_results
from fedmq.settings import ENVIRONMENT, add_location_flags, redact, resolve
from model_store import StoreError

_HEADER = (
    f"{'round':>5}  {'state':<9} {'selected':>8} {'reported':>8} {'loss':>8} "
    f"{'accuracy':>8} {'seconds':>8}"
)

_USER_ERRORS = (ServiceError, BrokerError, DeviceError, DataError, StoreError, TimeoutError)


def _print_round(record: RoundRecord) -> None:
    """Print one progress row as a round ends."""
    row = round_row(record)

    def num(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    print(
        f"{row['round']:>5}  {row['state']:<9} {row['selected']:>8} {row['reported']:>8} "
        f"{num(row['loss'], '8.4f')} {num(row['accuracy'], '8.4f')} "
        f"{num(row['duration_s'], '8.2f')}",
        flush=True,
    )


def _run_and_report(
    config: ExperimentConfig, rounds: int | None, out: Path | None, broker: str = "memory://"
) -> RunResult:
    """Run an experiment with a progress table; write results to ``out``."""
    print(
        f"experiment {config.name}: {config.data.devices} devices, "
        f"{config.data.dataset}/{config.data.partition}, strategy "
        f"{config.strategy.get('name')}, {rounds or config.rounds.count} rounds, "
        f"broker {redact(broker)}"
    )
    print(_HEADER, flush=True)
    count = rounds or config.rounds.count
    # Every round ends by its deadline; past that margin something is stuck.
    timeout = count * (config.rounds.deadline_s + 30.0) + 120.0
    result = run_experiment(
        config, broker_url=broker, rounds=rounds, progress=_print_round, timeout_s=timeout
    )
    final = result.final_metrics
    print(
        f"done in {result.wall_time_s:.1f} s; final accuracy "
        f"{final.get('accuracy', float('nan')):.4f}, loss {final.get('loss', float('nan')):.4f}"
    )
    if out is not None:
        write_results(
            out,
            experiment_id=result.experiment_id,
            config=config.to_dict(),
            rounds=result.rounds,
            initial_weights=result.initial_weights,
            final_weights=result.final_weights,
            wall_time_s=result.wall_time_s,
        )
        print(
            f"results written to {out}/ (rounds.csv, results.json, model_*.safetensors, "
            "accuracy_loss.png)"
        )
    return result


def _cmd_demo(args: argparse.Namespace) -> int:
    raw = dict(DEMO_CONFIG)
    if args.devices is not None:
        raw["data"] = {**raw["data"], "devices": args.devices}
        per_round = min(raw["rounds"]["devices_per_round"], args.devices)
        raw["rounds"] = {
            **raw["rounds"],
            "devices_per_round": per_round,
            "min_reports": min(raw["rounds"]["min_reports"], per_round),
        }
    config = ExperimentConfig.from_dict(raw)
    url = args.broker or os.environ.get(ENVIRONMENT["broker"])
    if url:
        _run_and_report(config, args.rounds, args.out, url)
        return 0
    with EmbeddedBroker() as embedded:
        _run_and_report(config, args.rounds, args.out, embedded.url)
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    _run_and_report(load_config(args.config), args.rounds, args.out)
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    run_server(
        host=args.host,
        port=args.port,
        broker=resolve(args, "broker"),
        store_url=resolve(args, "store"),
        db_url=resolve(args, "db"),
        public_url=args.public_url,
        recovery_grace_s=args.recovery_grace,
    )
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    run_worker(
        broker=resolve(args, "broker"),
        store_url=resolve(args, "store"),
        group=args.group or os.environ.get("FEDMQ_WORKER_GROUP") or topics.UPDATES_GROUP,
        name=args.name or f"fedmq-worker-{socket.gethostname()}",
        checkpoint_every=args.checkpoint_every,
        health_file=args.health_file,
    )
    return 0


def _cmd_fleet(args: argparse.Namespace) -> int:
    run_fleet(
        broker=resolve(args, "broker"),
        server=resolve(args, "server"),
        devices=args.devices,
        experiment_id=args.experiment,
        seed=args.seed,
        first=args.first,
        prefix=args.prefix,
        concurrency=args.concurrency,
        heartbeat_s=args.heartbeat,
        health_file=args.health_file,
    )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every `fedmq` subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedmq", description="Message-queue based federated learning."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a federated demo on embedded defaults")
    demo.add_argument("--rounds", type=_positive, help="rounds to run (default 10)")
    demo.add_argument("--devices", type=_positive, help="emulated devices (default 20)")
    demo.add_argument("--out", type=Path, help="write rounds.csv, results.json, models, plot")
    demo.add_argument(
        "--broker",
        metavar="URL",
        help="broker URL (default: $FEDMQ_BROKER_URL, else an embedded MQTT broker; "
        "memory:// runs on the in-process bus)",
    )
    demo.set_defaults(func=_cmd_demo)

    simulate_cmd = sub.add_parser("simulate", help="simulate an experiment config in-process")
    simulate_cmd.add_argument("config", type=Path, help="experiment config (.json or .toml)")
    simulate_cmd.add_argument("--rounds", type=_positive, help="override rounds.count")
    simulate_cmd.add_argument("--out", type=Path, help="write results into this folder")
    simulate_cmd.set_defaults(func=_cmd_simulate)

    server = sub.add_parser("server", help="the REST API, dashboard and round coordinator")
    server.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    server.add_argument("--public-url", help="URL devices reach this service at (signed links)")
    server.add_argument(
        "--recovery-grace",
        type=float,
        default=0.0,
        metavar="S",
        help="after a restart, wait S seconds for devices to check in before new rounds",
    )
    add_location_flags(server, "broker", "store", "db")
    server.set_defaults(func=_cmd_server)

    worker = sub.add_parser("worker", help="an aggregator worker")
    worker.add_argument("--health-file", type=Path, help="touch this file every 5 s")
    worker.add_argument(
        "--checkpoint-every",
        type=_positive,
        default=32,
        help="checkpoint a round's aggregate and ack its updates every N folds (default 32)",
    )
    worker.add_argument(
        "--name",
        help="stable worker identity (MQTT client id; default fedmq-worker-<hostname>)",
    )
    worker.add_argument(
        "--group",
        help=f"update queue shared by this deployment's workers "
        f"(default: $FEDMQ_WORKER_GROUP, else {topics.UPDATES_GROUP})",
    )
    add_location_flags(worker, "broker", "store")
    worker.set_defaults(func=_cmd_worker)

    fleet = sub.add_parser("fleet", help="an emulated device fleet")
    fleet.add_argument("--devices", type=_positive, required=True, help="how many devices")
    fleet.add_argument("--experiment", help="experiment id (default: the newest)")
    fleet.add_argument("--seed", type=int, help="partition seed (default: the experiment's)")
    fleet.add_argument("--first", type=int, default=0, help="index of the first device")
    fleet.add_argument("--prefix", default="emu", help="device id prefix (default emu)")
    fleet.add_argument("--concurrency", type=_positive, default=2, help="devices training at once")
    fleet.add_argument("--health-file", type=Path, help="touch this file every 5 s")
    fleet.add_argument(
        "--heartbeat",
        type=float,
        default=30.0,
        metavar="S",
        help="check every device in again every S seconds (default 30)",
    )
    add_location_flags(fleet, "broker", "server")
    fleet.set_defaults(func=_cmd_fleet)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `fedmq` command; return its exit status."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    # force: onnxruntime configures the root logger when it is imported
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.getLogger("werkzeug").setLevel(level)  # it sets INFO on itself otherwise
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"fedmq: invalid config: {exc}", file=sys.stderr)
        return 2
    except _USER_ERRORS as exc:
        print(f"fedmq: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedmq: interrupted", file=sys.stderr)
        return 130
