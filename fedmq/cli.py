"""The `fedmq` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from aggregator_service import ConfigError, ExperimentConfig, ServiceError, load_config
from aggregator_service.persistence import RoundRecord
from broker import BrokerError
from device_sdk import DeviceError
from device_sdk.data.errors import DataError
from fedmq.compose import RunResult, simulate
from fedmq.defaults import DEMO_CONFIG
from fedmq.results import round_row, write_results
from model_store import StoreError

_HEADER = (
    f"{'round':>5}  {'state':<9} {'selected':>8} {'reported':>8} {'loss':>8} "
    f"{'accuracy':>8} {'seconds':>8}"
)

_USER_ERRORS = (ServiceError, BrokerError, DeviceError, DataError, StoreError)


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


def _run_and_report(config: ExperimentConfig, rounds: int | None, out: Path | None) -> RunResult:
    """Run a simulation with a progress table; write results to ``out``."""
    print(
        f"experiment {config.name}: {config.data.devices} devices, "
        f"{config.data.dataset}/{config.data.partition}, strategy "
        f"{config.strategy.get('name')}, {rounds or config.rounds.count} rounds"
    )
    print(_HEADER, flush=True)
    result = simulate(config, rounds=rounds, progress=_print_round)
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
    _run_and_report(ExperimentConfig.from_dict(raw), args.rounds, args.out)
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    _run_and_report(load_config(args.config), args.rounds, args.out)
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
    demo.set_defaults(func=_cmd_demo)

    simulate_cmd = sub.add_parser("simulate", help="simulate an experiment config in-process")
    simulate_cmd.add_argument("config", type=Path, help="experiment config (.json or .toml)")
    simulate_cmd.add_argument("--rounds", type=_positive, help="override rounds.count")
    simulate_cmd.add_argument("--out", type=Path, help="write results into this folder")
    simulate_cmd.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `fedmq` command; return its exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
