"""The `fedmq` command."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import re
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from aggregator_service import ConfigError, ExperimentConfig, ServiceError, load_config
from aggregator_service.config import check_model_size
from broker import BrokerError
from broker.embedded import EmbeddedBroker
from broker.topics import is_valid_segment
from device_sdk import DeviceError
from device_sdk.data.errors import DataError
from device_sdk.emulator.profiles import PROFILES, load_profile
from fedmq.argtypes import DAY_S, UsageError, port, positive, seconds, seed, whole_number
from fedmq.defaults import DEMO_CONFIG
from fedmq.devices import add_devices_command
from fedmq.export import EXPORT_PLATFORMS, ExportUsageError, export_package, parse_shape
from fedmq.platforms import parse_mix
from fedmq.runs import add_run_commands
from fedmq.settings import (
    Settings,
    SettingsError,
    add_location_flags,
    add_trust_flags,
    load_settings,
    redact,
)
from model_store import StoreError
from model_store.export.executorch import DEFAULT_MAX_BATCH

if TYPE_CHECKING:
    from aggregator_service.persistence import RoundRecord
    from fedmq.compose import RunResult

# Each command imports what it runs when it runs: `fedmq worker` never loads the
# database layer, the REST API or onnxruntime, and `fedmq --help` only the parser's needs.

_HEADER = (
    f"{'round':>5}  {'state':<9} {'selected':>8} {'reported':>8} {'loss':>8} "
    f"{'accuracy':>8} {'seconds':>8}"
)

_USER_ERRORS = (ServiceError, BrokerError, DeviceError, DataError, StoreError, TimeoutError)


def _print_round(record: RoundRecord) -> None:
    """Print one progress row as a round ends."""
    from fedmq.results import round_row

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
    config: ExperimentConfig,
    settings: Settings,
    rounds: int | None,
    out: Path | None,
    broker: str = "memory://",
    profile: str | None = None,
    workers: int = 1,
    regions: int = 1,
) -> RunResult:
    """Run an experiment with a progress table; write results to ``out``.

    ``profile`` names device speeds (``--profile``): in-process, the run then
    goes in emulated time and the seconds column reads emulated seconds.
    """
    from fedmq.compose import run_experiment
    from fedmq.results import write_results

    speed = None
    if profile is not None:
        speed = load_profile(profile, seed=config.seed, devices=config.data.devices)
    print(
        f"experiment {config.name}: {config.data.devices} devices, "
        f"{config.data.dataset}/{config.data.partition}, strategy "
        f"{config.strategy.name}, {rounds or config.rounds.count} rounds, "
        f"broker {redact(broker)}"
    )
    print(_HEADER, flush=True)
    count = rounds or config.rounds.count
    # Every round ends by its deadline; past that margin something is stuck.
    timeout = count * (config.rounds.deadline_s + 30.0) + 120.0
    result = run_experiment(
        config,
        broker_url=broker,
        rounds=rounds,
        progress=_print_round,
        timeout_s=timeout,
        profile=speed,
        workers=workers,
        regions=regions,
        settings=settings,
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


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from fedmq.results import prepare_folder

    if args.out is not None:
        prepare_folder(args.out)  # before the rounds, not after them
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
    if settings.broker:
        _run_and_report(config, settings, args.rounds, args.out, settings.broker)
        return 0
    with EmbeddedBroker() as embedded:
        _run_and_report(config, settings, args.rounds, args.out, embedded.url)
    return 0


def _cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from device_sdk.data import check_available
    from fedmq.results import prepare_folder

    config = load_config(args.config)
    # As `validate` and the service do: a model too large to build ends here in a line.
    check_model_size(config, settings.max_model_parameters)
    if args.out is not None:
        prepare_folder(args.out)
    check_available(config.data.dataset, settings.data_dirs)  # before the header, not after
    result = _run_and_report(
        config,
        settings,
        args.rounds,
        args.out,
        profile=args.profile,
        workers=args.workers,
        regions=args.regions,
    )
    abandoned = [r for r in result.rounds if r.state == "abandoned"]
    for record in abandoned:
        print(f"fedmq: round {record.number} abandoned: {record.reason}", file=sys.stderr)
    return 1 if abandoned else 0


def _cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from device_sdk.data import check_available

    config = load_config(args.config)
    check_model_size(config, settings.max_model_parameters)
    strategy = config.strategy
    print(
        f"{args.config}: valid. {config.name}: {config.data.devices} devices on "
        f"{config.data.dataset}/{config.data.partition}, model {config.model.get('zoo')}, "
        f"strategy {strategy.name} {dict(strategy.settings) or ''}".rstrip()
    )
    try:
        check_available(config.data.dataset, settings.data_dirs)
    except DataError as exc:  # valid for a service; a run on this machine would stop here
        print(
            f"note: `simulate` and fleets on this machine cannot run it yet: {exc}", file=sys.stderr
        )
    return 0


def _cmd_server(args: argparse.Namespace, settings: Settings) -> int:
    from fedmq.processes import run_server

    _check_host(args.host, args.port)
    run_server(
        settings,
        host=args.host,
        port=args.port,
        public_url=args.public_url,
        recovery_grace_s=args.recovery_grace,
    )
    return 0


def _cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from fedmq.processes import run_worker

    run_worker(
        settings,
        name=args.name or default_worker_name(),
        checkpoint_every=args.checkpoint_every,
        health_file=args.health_file,
    )
    return 0


def default_worker_name(hostname: str | None = None) -> str:
    """Return ``fedmq-worker-<hostname>``, the hostname mapped to what a client id takes.

    Hostnames may hold dots (ip-10-0-0-1.ec2.internal), which a key name and a
    topic segment cannot: each other character becomes '-'. The name stays the
    same on every start, so a restarted worker resumes its broker session.
    """
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname() if hostname is None else hostname)
    return f"fedmq-worker-{host}"[:128]  # a segment's longest


def _check_host(host: str, port_number: int) -> None:
    """Raise ``UsageError`` for a ``--host`` that names no address (waitress would trace back)."""
    try:
        socket.getaddrinfo(host, port_number, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise UsageError(f"--host {host}: not an address or name to listen on ({why})") from None


def _cmd_bridge(args: argparse.Namespace, settings: Settings) -> int:
    from fedmq.processes import run_bridge

    run_bridge(settings, region=args.region, name=args.name, health_file=args.health_file)
    return 0


def _cmd_fleet(args: argparse.Namespace, settings: Settings) -> int:
    from fedmq.processes import FleetOptions, run_fleet

    options = FleetOptions(
        devices=args.devices,
        experiment_id=args.experiment,
        seed=args.seed,
        first=args.first,
        prefix=args.prefix,
        concurrency=args.concurrency,
        heartbeat_s=args.heartbeat,
        platforms=args.platforms,
        profile=args.profile,
    )
    run_fleet(settings, options, health_file=args.health_file)
    return 0


def _cmd_conformance(args: argparse.Namespace, settings: Settings) -> int:
    from fedmq.conformance import run_command  # torch and the bridges, only for this command

    return run_command(args, settings)


def _platform_mix(text: str) -> dict[str, float]:
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    try:
        written = export_package(
            platform=args.platform,
            out=args.out,
            input_shape=args.input_shape,
            model=args.model,
            zoo=args.zoo,
            num_classes=args.num_classes,
            hidden=args.hidden or (),
            seed=args.seed,
            force=args.force,
            max_batch=args.max_batch,
            max_parameters=settings.max_model_parameters,
        )
    except ExportUsageError as exc:
        print(f"fedmq export: {exc}", file=sys.stderr)
        return 2
    for file in written:
        print(file.summary())
    print(f"{args.platform} package: {len(written)} files in {args.out}")
    return 0


def _shape(text: str) -> tuple[int, ...]:
    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_profile_flag(parser: argparse.ArgumentParser, how: str) -> None:
    """Add ``--profile NAME|TRACE`` (alias ``--trace``: device speeds) to a subcommand."""
    parser.add_argument(
        "--profile",
        "--trace",
        dest="profile",
        metavar="NAME|TRACE",
        help=f"device speeds: {' or '.join(PROFILES)} (50%% at 1x, 30%% at 3x, 20%% at 10x), "
        "a device trace file (compute, bandwidth and availability windows; docs/traces.md), "
        f'or a JSON delay map {{index: delay seconds | {{"factor": f}}}}; {how}',
    )


def _segment(text: str) -> str:
    if not is_valid_segment(text):
        raise argparse.ArgumentTypeError("letters, digits, '_' and '-' only")
    return text


def _max_batch(text: str) -> int:
    value = positive(text)
    if value < 2:
        raise argparse.ArgumentTypeError("must be 2 or more (a dynamic batch axis needs two sizes)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of every `fedmq` subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedmq", description="Message-queue based federated learning."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress details (anywhere on the line)"
    )
    parser.add_argument("--version", action="version", version=f"fedmq {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a federated demo on embedded defaults")
    demo.add_argument("--rounds", type=positive, help="rounds to run (default 10)")
    demo.add_argument("--devices", type=positive, help="emulated devices (default 20)")
    demo.add_argument("--out", type=Path, help="write rounds.csv, results.json, models, plot")
    demo.add_argument(
        "--broker",
        metavar="URL",
        help="broker URL (default: $FEDMQ_BROKER_URL, else an embedded MQTT broker; "
        "memory:// runs on the in-process bus)",
    )
    add_location_flags(demo, "store")
    demo.set_defaults(func=_cmd_demo)

    simulate_cmd = sub.add_parser("simulate", help="simulate an experiment config in-process")
    simulate_cmd.add_argument("config", type=Path, help="experiment config (.json or .toml)")
    simulate_cmd.add_argument("--rounds", type=positive, help="override rounds.count")
    simulate_cmd.add_argument("--out", type=Path, help="write results into this folder")
    _add_profile_flag(simulate_cmd, "devices train in emulated time (deterministic)")
    simulate_cmd.add_argument(
        "--workers",
        type=positive,
        default=1,
        help="aggregator workers sharing the update queue (per region with --regions; default 1)",
    )
    simulate_cmd.add_argument(
        "--regions",
        type=positive,
        default=1,
        help="run an aggregation tree: N regions, each its own bus, devices and edge "
        "workers, bridged to a root that combines (default 1: no tree)",
    )
    add_location_flags(simulate_cmd, "store")
    simulate_cmd.set_defaults(func=_cmd_simulate)

    validate = sub.add_parser(
        "validate",
        help="check an experiment config against its data set and model",
        description="Check a config as the service would at POST /experiments (model size "
        "against $FEDMQ_MAX_MODEL_PARAMETERS included), listing every problem (exit 2) or "
        "printing one line of what it runs (exit 0). "
        "Example: fedmq validate experiments/configs/digits_fedavg.json",
    )
    validate.add_argument("config", type=Path, help="experiment config (.json or .toml)")
    validate.set_defaults(func=_cmd_validate)

    server = sub.add_parser("server", help="the REST API, dashboard and round coordinator")
    server.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    server.add_argument(
        "--port", type=port, default=8080, help="port, 0 to 65535 (0: any free; default 8080)"
    )
    server.add_argument("--public-url", help="URL devices reach this service at (signed links)")
    server.add_argument(
        "--recovery-grace",
        type=seconds(0, DAY_S),
        default=60.0,
        metavar="S",
        help="after a restart, draw no new cohort until every device seen before it has "
        "checked in again, for at most S seconds (default 60: two of the fleet's 30 s "
        "heartbeats; 0 starts at once; at most 86400)",
    )
    add_location_flags(server, "broker", "store", "db")
    add_trust_flags(server)
    server.set_defaults(func=_cmd_server)

    worker = sub.add_parser("worker", help="an aggregator worker")
    worker.add_argument("--health-file", type=Path, help="touch this file every 5 s")
    worker.add_argument(
        "--checkpoint-every",
        type=positive,
        default=32,
        help="checkpoint a round's aggregate and ack its updates every N folds (default 32)",
    )
    worker.add_argument(
        "--name",
        type=_segment,
        help="stable worker identity (MQTT client id; default fedmq-worker-<hostname>)",
    )
    worker.add_argument(
        "--group",
        type=_segment,
        help="update queue shared by this deployment's workers "
        "(default: $FEDMQ_WORKER_GROUP, else NAMESPACE-aggregators)",
    )
    add_location_flags(worker, "broker", "store")
    add_trust_flags(worker)
    worker.set_defaults(func=_cmd_worker)

    bridge = sub.add_parser(
        "bridge",
        help="carry a region's traffic to and from the root broker (an aggregation tree)",
        description="Bridge a region's broker to the root's (--broker). The region's devices "
        "and edge workers (`fedmq worker --broker REGION_URL`) use the region's broker; "
        "check-ins and the workers' partials go up, round control and tasks come down, "
        "updates stay in the region. Example: fedmq bridge --name eu "
        "--region mqtt://eu-broker:1883 --broker amqp://root-broker:5672/",
    )
    bridge.add_argument("--region", metavar="URL", required=True, help="the region's broker")
    bridge.add_argument(
        "--name", required=True, type=_segment, help="the region's name (names its queues)"
    )
    bridge.add_argument("--health-file", type=Path, help="touch this file every 5 s")
    add_location_flags(bridge, "broker")
    add_trust_flags(bridge, keys=False)  # it carries signed frames; it signs nothing
    bridge.set_defaults(func=_cmd_bridge)

    fleet = sub.add_parser("fleet", help="an emulated device fleet")
    fleet.add_argument("--devices", type=positive, required=True, help="how many devices")
    fleet.add_argument("--experiment", help="experiment id (default: the newest)")
    fleet.add_argument(
        "--seed", type=seed, help="partition seed, 0 or more (default: the experiment's)"
    )
    fleet.add_argument(
        "--first", type=whole_number(0), default=0, help="index of the first device (default 0)"
    )
    fleet.add_argument(
        "--prefix",
        help="device id prefix (default emu, and NAMESPACE-emu in a namespace other than "
        "fedmq: MQTT client ids are broker-wide, so deployments sharing a broker need their own)",
    )
    fleet.add_argument(
        "--concurrency",
        type=positive,
        default=2,
        help="devices training at once (default 2; all of them under --profile)",
    )
    fleet.add_argument("--health-file", type=Path, help="touch this file every 5 s")
    fleet.add_argument(
        "--heartbeat",
        type=seconds(1, DAY_S),
        default=30.0,
        metavar="S",
        # Below a second, the fleet's check-ins alone keep a server core busy (as devices run).
        help="check every device in again every S seconds, 1 to 86400 (default 30)",
    )
    fleet.add_argument(
        "--platforms",
        type=_platform_mix,
        default={"python": 1.0},
        metavar="MIX",
        help="share of each platform among the experiment's devices, e.g. "
        "python:2,android:1,ios:1 (android and ios train the model's ExecuTorch "
        "programs, docs/mobile.md; default python)",
    )
    _add_profile_flag(fleet, "each device sleeps out its delay after training")
    add_location_flags(fleet, "broker", "server")
    add_trust_flags(fleet)
    fleet.set_defaults(func=_cmd_fleet)
    add_devices_command(sub)
    add_run_commands(sub)

    export = sub.add_parser("export", help="package a torch model for a device platform")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", metavar="MODULE:FACTORY", help="a callable that returns a torch.nn.Module"
    )
    source.add_argument("--zoo", metavar="NAME", help="a zoo model (logreg, mlp, ...) instead")
    export.add_argument(
        "--input-shape",
        type=_shape,
        required=True,
        metavar="SHAPE",
        help="one example's shape without the batch axis, comma separated (e.g. 1,28,28)",
    )
    export.add_argument(
        "--platform", choices=EXPORT_PLATFORMS, required=True, help="the devices' platform"
    )
    export.add_argument("--out", type=Path, required=True, help="folder to write (created)")
    export.add_argument(
        "--num-classes", type=positive, help="classes (required with --zoo; else checked)"
    )
    export.add_argument("--hidden", type=_shape, metavar="SIZES", help="hidden sizes of a zoo mlp")
    export.add_argument(
        "--seed", type=seed, default=0, help="a zoo model's weight seed, 0 or more (default 0)"
    )
    export.add_argument("--force", action="store_true", help="write into a non-empty folder")
    export.add_argument(
        "--max-batch",
        type=_max_batch,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help=f"largest batch the phones' ExecuTorch programs take, 2 or more (android, ios; "
        f"default {DEFAULT_MAX_BATCH})",
    )
    export.set_defaults(func=_cmd_export)
    _add_conformance_command(sub)
    return parser


def _add_conformance_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``fedmq conformance`` (docs/conformance.md): the kit that checks a device."""
    check = sub.add_parser(
        "conformance", help="play the service against a device under test and report each check"
    )
    add_location_flags(check, "broker")
    check.add_argument(
        "--namespace", metavar="NS", help="the device's topic namespace ($FEDMQ_NAMESPACE, fedmq)"
    )
    check.add_argument("--device-id", type=_segment, required=True, help="the device's id")
    check.add_argument(
        "--device-key",
        type=Path,
        required=True,
        metavar="PATH",
        help="file holding the device's public key (base64 of its 32 raw bytes)",
    )
    check.add_argument(
        "--service-key",
        type=Path,
        metavar="PATH",
        help="the kit's service key file, made on first use (default: a new key each run)",
    )
    check.add_argument(
        "--platform",
        choices=EXPORT_PLATFORMS,
        default="python",
        help="the package the tasks carry (default python)",
    )
    check.add_argument(
        "--timeout",
        type=seconds(0.1, DAY_S),
        default=60.0,
        metavar="S",
        help="seconds to wait for each thing the device should do, 0.1 to 86400 (default 60)",
    )
    check.add_argument(
        "--come-back-after",
        type=seconds(0, DAY_S),
        default=5.0,
        metavar="S",
        help="retry_after_s of the come-back-later note, 0 to 86400 (default 5)",
    )
    check.add_argument(
        "--http",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where the kit serves artifacts (default 127.0.0.1, any port)",
    )
    check.add_argument(
        "--public-url", metavar="URL", help="the artifact server's URL as the device reaches it"
    )
    check.set_defaults(func=_cmd_conformance)


def _version() -> str:
    try:
        return importlib.metadata.version("fedmq")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout, not installed
        return "unknown"


def _verbose_first(argv: Sequence[str]) -> list[str]:
    """Move ``-v``/``--verbose`` before the command, so it is taken wherever it was typed."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in ("-v", "--verbose")]
    rest = [a for i, a in enumerate(argv) if i >= end or a not in ("-v", "--verbose")]
    return flags[:1] + rest


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `fedmq` command; return its exit status."""
    args = build_parser().parse_args(_verbose_first(sys.argv[1:] if argv is None else argv))
    level = logging.INFO if args.verbose else logging.WARNING
    # force: whatever an import configured before this (none of FedMQ's does) is replaced
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # The broker clients log every failed attempt with a traceback; FedMQ reports the
    # outcome in one line, so theirs are for -v only.
    for library in ("pika", "paho", "amqtt"):
        logging.getLogger(library).setLevel(logging.INFO if args.verbose else logging.CRITICAL)
    try:
        # The one read of the environment: every command gets these settings passed.
        settings = load_settings(args)
        return int(args.func(args, settings))
    except UsageError as exc:
        print(f"fedmq: {exc}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"fedmq: invalid setting: {problem}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"fedmq: invalid config: {problem}", file=sys.stderr)
        return 2
    except _USER_ERRORS as exc:
        print(f"fedmq: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fedmq: interrupted", file=sys.stderr)
        return 130
