"""Commands that drive a running service: submit, ls, status, watch, stop, model pull.

Each is a thin client of the REST API (``fedmq.rest``); ``--json`` prints the
API's own answer for scripts. The server is the settings' (``--server`` or
``$FEDMQ_SERVER_URL``); reads use the viewer token (or the admin token),
changes the admin token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from aggregator_service import load_config
from fedmq.argtypes import UsageError, positive, whole_number
from fedmq.rest import RestClient, api_path
from fedmq.settings import Settings, add_location_flags

EXPERIMENTS = "/api/v1/experiments"
POLL_S = 1.0
"""How often ``watch`` asks for news."""


def _experiment(experiment_id: str, *rest: str) -> str:
    """Return the API path of an experiment (or of ``rest`` under it), the id escaped."""
    return EXPERIMENTS + api_path(experiment_id, *rest)


def add_run_commands(sub: Any) -> None:
    """Add ``submit``, ``ls``, ``status``, ``watch``, ``stop`` and ``model pull``."""
    submit = _command(
        sub,
        "submit",
        "create an experiment on a running service and start its rounds",
        "fedmq submit experiments/configs/digits_fedavg.json --rounds 5 --watch",
    )
    submit.add_argument("config", type=Path, help="experiment config (.json or .toml)")
    submit.add_argument("--rounds", type=positive, help="rounds to run (default: rounds.count)")
    submit.add_argument("--watch", action="store_true", help="follow the rounds until they end")
    submit.set_defaults(func=_submit)

    listing = _command(sub, "ls", "list the service's experiments", "fedmq ls --json")
    listing.set_defaults(func=_list)

    status = _command(sub, "status", "show an experiment and its rounds", "fedmq status ID")
    status.add_argument("experiment", help="experiment id")
    status.set_defaults(func=_status)

    watch = _command(sub, "watch", "follow an experiment's rounds until they end", "fedmq watch ID")
    watch.add_argument("experiment", help="experiment id")
    watch.set_defaults(func=_watch)

    stop = _command(
        sub,
        "stop",
        "stop an experiment: abandon its round in flight (or, with --after-round, "
        "let it finish) and start no more",
        "fedmq stop ID --after-round",
    )
    stop.add_argument("experiment", help="experiment id")
    stop.add_argument(
        "--after-round", action="store_true", help="let the round in flight finish first"
    )
    stop.set_defaults(func=_stop)

    model = sub.add_parser("model", help="model versions of an experiment")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    pull = _command(
        model_sub,
        "pull",
        "download an experiment's global model (safetensors)",
        "fedmq model pull ID --version 3 --out model.safetensors",
    )
    pull.add_argument("experiment", help="experiment id")
    pull.add_argument("--version", type=whole_number(0), help="model version (default: the latest)")
    pull.add_argument("--out", type=Path, help="file to write (default: ID-vN.safetensors)")
    pull.set_defaults(func=_pull)


def _command(sub: Any, name: str, summary: str, example: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. Example: {example}"
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    add_location_flags(parser, "server")
    return parser


def _api(settings: Settings, *, admin: bool = False) -> RestClient:
    token = settings.admin_token if admin else settings.viewer_credential
    return RestClient(settings.server_url, token)


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    config = load_config(args.config)  # every problem listed here, before the service sees it
    api = _api(settings, admin=True)
    experiment_id = str(api.json("POST", EXPERIMENTS, config.to_dict())["id"])
    count = args.rounds or config.rounds.count
    started = api.json("POST", _experiment(experiment_id, "rounds"), {"count": count})
    if args.json and not args.watch:
        print(json.dumps(started, indent=2))
        return 0
    print(experiment_id if args.json else f"submitted {experiment_id}: {count} round(s)")
    return _follow(api, experiment_id, as_json=args.json) if args.watch else 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    experiments = _api(settings).json("GET", EXPERIMENTS)
    if args.json:
        print(json.dumps(experiments, indent=2))
        return 0
    print(f"{'experiment':<28} {'name':<24} {'state':<9} {'rounds':>9} {'version':>7}")
    for exp in experiments["experiments"]:
        rounds = f"{exp['current_round']}/{exp['rounds_requested']}"
        print(
            f"{exp['id']:<28} {exp['name'][:24]:<24} {exp['state']:<9} {rounds:>9} "
            f"{exp['model_version']:>7}"
        )
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    api = _api(settings)
    exp = api.json("GET", _experiment(args.experiment))
    rounds = api.json("GET", _experiment(args.experiment, "rounds"))["rounds"]
    if args.json:
        print(json.dumps({**exp, "rounds": rounds}, indent=2))
        return 0
    strategy = exp["config"]["strategy"]["name"]
    print(
        f"{exp['id']} ({exp['name']}, {strategy}): {exp['state']}, round "
        f"{exp['current_round']} of {exp['rounds_requested']}, model v{exp['model_version']}"
    )
    waiting = exp.get("waiting")
    if isinstance(waiting, dict):
        print(f"waiting for {waiting.get('needed')} devices, {waiting.get('online')} online")
    print(_HEADER)
    for record in rounds:
        print(_row(record))
    return 0


def _watch(args: argparse.Namespace, settings: Settings) -> int:
    return _follow(_api(settings), args.experiment, as_json=args.json)


def _stop(args: argparse.Namespace, settings: Settings) -> int:
    action = "pause" if args.after_round else "stop"
    answer = _api(settings, admin=True).json("POST", _experiment(args.experiment, action))
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.after_round:
        print(f"{args.experiment}: no more rounds after round {answer['current_round']}")
    else:
        print(f"{args.experiment}: stopped")
    return 0


def _pull(args: argparse.Namespace, settings: Settings) -> int:
    if args.out is not None:
        _check_writable(args.out)  # before the download, which may be large
    query = "" if args.version is None else f"?version={args.version}"
    api = _api(settings)
    data = api.raw("GET", _experiment(args.experiment, "model") + query)
    version = args.version
    if version is None:
        version = api.json("GET", _experiment(args.experiment))["model_version"]
    out = args.out or Path(f"{args.experiment}-v{version}.safetensors")
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc.strerror or exc}") from None
    summary = {"experiment": args.experiment, "version": version, "file": str(out)}
    print(json.dumps(summary) if args.json else f"wrote {out} ({len(data):,} bytes, v{version})")
    return 0


def _check_writable(out: Path) -> None:
    """Raise ``UsageError`` for an ``--out`` that names a folder or a file in no folder."""
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the file to write")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: {out.parent} is not a folder")


_HEADER = (
    f"{'round':>5}  {'state':<9} {'selected':>8} {'reported':>8} {'accepted':>8} "
    f"{'loss':>8} {'accuracy':>8}  reason"
)


def _row(record: dict[str, Any]) -> str:
    metrics = record.get("metrics") or {}

    def num(key: str) -> str:
        value = metrics.get(key)
        return f"{value:8.4f}" if isinstance(value, int | float) else f"{'-':>8}"

    return (
        f"{record['round']:>5}  {record['state']:<9} {record['selected']:>8} "
        f"{record['reported']:>8} {record['accepted']:>8} {num('loss')} {num('accuracy')}  "
        f"{record.get('reason') or ''}"
    ).rstrip()


def _follow(api: RestClient, experiment_id: str, *, as_json: bool, out: TextIO = sys.stdout) -> int:
    """Print each round as it ends until the experiment has none in flight or queued.

    Returns 0 when every round followed committed, 1 when any was abandoned.
    """
    shown: set[int] = set()
    abandoned = 0
    live = out.isatty() and not as_json
    if not as_json:
        print(_HEADER, file=out, flush=True)
    while True:
        exp = api.json("GET", _experiment(experiment_id))
        rounds = api.json("GET", _experiment(experiment_id, "rounds"))["rounds"]
        for record in rounds:
            if record["state"] == "training" or record["round"] in shown:
                continue
            shown.add(record["round"])
            abandoned += record["state"] == "abandoned"
            if live:
                print("\r\033[K", end="", file=out)
            print(json.dumps(record) if as_json else _row(record), file=out, flush=True)
        in_flight = [r for r in rounds if r["state"] == "training"]
        if not in_flight and exp["current_round"] >= exp["rounds_requested"]:
            return 1 if abandoned else 0
        if live:
            print("\r\033[K" + _progress(exp, in_flight), end="", file=out, flush=True)
        time.sleep(POLL_S)


def _progress(exp: dict[str, Any], in_flight: list[dict[str, Any]]) -> str:
    """Return one line on the round in flight: answers so far and time to its deadline."""
    if not in_flight:
        waiting = exp.get("waiting")
        if isinstance(waiting, dict):
            return f"waiting for {waiting.get('needed')} devices, {waiting.get('online')} online"
        return f"{exp['state']}..."
    record = in_flight[-1]
    progress = record.get("progress") or {}
    reported = progress.get("reported", record["reported"])
    left = max(0.0, float(record["deadline_at"] or 0) - time.time())
    return (
        f"round {record['round']}: {reported}/{record['selected']} answered, "
        f"{progress.get('phase', 'training')}, deadline in {left:.0f} s"
    )
