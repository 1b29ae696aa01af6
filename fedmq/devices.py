"""`fedmq devices`: enroll, list, rotate and revoke device identities; run an edge device."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aggregator_service import ServiceError
from broker.identity import Identity
from fedmq.argtypes import DAY_S, seconds, whole_number
from fedmq.rest import RestClient, api_path
from fedmq.settings import Settings, add_location_flags, add_trust_flags


def add_devices_command(sub: Any) -> None:
    """Add ``fedmq devices enroll|list|rotate|revoke|run`` to the command's subparsers."""
    devices = sub.add_parser(
        "devices", help="enroll, list, rotate and revoke device identities; run an edge device"
    )
    actions = devices.add_subparsers(dest="action", required=True)
    enroll = actions.add_parser("enroll", help="register a device; its key is made here")
    enroll.add_argument("--platform", default="python", help="android, ios, python or emulated")
    enroll.add_argument("--device-id", help="the id to register (default: one made up)")
    enroll.add_argument(
        "--key-file",
        type=Path,
        required=True,
        help="where the device's private key is written (mode 0600); it never leaves this host",
    )
    enroll.set_defaults(func=_enroll)
    listing = actions.add_parser("list", help="every device: platform, last seen, revoked")
    listing.set_defaults(func=_list)
    rotate = actions.add_parser("rotate", help="give a device a new key; the old one stops")
    rotate.add_argument("device_id")
    rotate.add_argument("--key-file", type=Path, required=True, help="the new private key's file")
    rotate.set_defaults(func=_rotate)
    revoke = actions.add_parser("revoke", help="revoke a device: refused on the bus at once")
    revoke.add_argument("device_id")
    revoke.set_defaults(func=_revoke)
    for parser in (enroll, listing, rotate, revoke):
        parser.add_argument("--json", action="store_true", help="print the JSON answer")
        add_location_flags(parser, "server")
    _add_run(actions)


def _add_run(actions: Any) -> None:
    run = actions.add_parser(
        "run", help="run this host as a Python edge device, training on examples of its own"
    )
    run.add_argument("--device-id", required=True, help="the device's id (letters, digits, _ -)")
    run.add_argument(
        "--key-file",
        type=Path,
        required=True,
        help="its private key, made on first use (mode 0600); it never leaves this host",
    )
    run.add_argument(
        "--data",
        type=Path,
        required=True,
        help="an .npz file of x (one row per example) and y (integer labels from 0)",
    )
    run.add_argument("--experiment", help="take part in this experiment only (default: any)")
    run.add_argument(
        "--seed", type=whole_number(0), default=0, help="seeds the batch order (default 0)"
    )
    run.add_argument(
        "--stream",
        type=whole_number(0),
        help="separates its batch order from others' (default: from its id)",
    )
    run.add_argument(
        "--heartbeat",
        type=seconds(1, DAY_S),
        default=30.0,
        metavar="S",
        # Below a second, one device's check-ins alone keep a server core busy.
        help="check in again every S seconds, 1 to 86400 (default 30)",
    )
    run.add_argument("--health-file", type=Path, help="touch this file every 5 s")
    add_location_flags(run, "broker", "server")
    add_trust_flags(run, keys=False)  # its key is --key-file
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from fedmq.edge import EdgeOptions, run_edge_device  # torch: only for this action

    options = EdgeOptions(
        device_id=args.device_id,
        key_file=args.key_file,
        data=args.data,
        experiment_id=args.experiment,
        seed=args.seed,
        stream=args.stream,
        heartbeat_s=args.heartbeat,
    )
    run_edge_device(settings, options, health_file=args.health_file)
    return 0


def _enroll(args: argparse.Namespace, settings: Settings) -> int:
    with key_file(args.key_file, args.device_id or "device", new=True) as identity:
        body: dict[str, Any] = {"platform": args.platform, "public_key": identity.public_key_text}
        if args.device_id:
            body["device_id"] = args.device_id
        answer = _call(settings, "POST", "/api/v1/devices", body, settings.enrollment_credential)
    return _show(args, answer, f"enrolled {answer['device_id']}; key in {args.key_file}")


def _list(args: argparse.Namespace, settings: Settings) -> int:
    answer = _call(settings, "GET", "/api/v1/devices", None, settings.viewer_credential)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    print(f"{'device':<32} {'platform':<18} {'served':>6} {'last seen':>12}  state")
    now = time.time()
    for device in _devices(answer):
        seen = ago(now - device["last_seen"]) if device["last_seen"] else "-"
        state = "revoked" if device.get("revoked") else "active"
        print(
            f"{device['id']:<32} {device['platform']:<18} {device['rounds_served']:>6} "
            f"{seen:>12}  {state}"
        )
    return 0


def _rotate(args: argparse.Namespace, settings: Settings) -> int:
    with key_file(args.key_file, args.device_id, new=True) as identity:
        path = api_path("api", "v1", "devices", args.device_id, "rotate")
        body = {"public_key": identity.public_key_text}
        answer = _call(settings, "POST", path, body, settings.admin_token)
    return _show(args, answer, f"rotated {args.device_id}; new key in {args.key_file}")


def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    path = api_path("api", "v1", "devices", args.device_id)
    answer = _call(settings, "DELETE", path, None, settings.admin_token)
    return _show(args, answer, f"revoked {args.device_id}")


@contextmanager
def key_file(path: Path, name: str, *, new: bool = False) -> Iterator[Identity]:
    """Yield the identity kept in ``path`` (made when absent) for registering it.

    A key made here is removed again when the body raises (the service refused
    it, the line dropped): a retry with the same ``path`` then starts afresh
    instead of meeting a key no service knows. ``new`` refuses an existing file.
    """
    made = not path.exists()
    if new and not made:
        raise ServiceError(f"{path} exists; choose a new file for the new key")
    identity = Identity.load_or_create(name, path)
    try:
        yield identity
    except BaseException:
        if made:
            path.unlink(missing_ok=True)
        raise


def _devices(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the listing's devices; raise ``ServiceError`` when it is not FedMQ's."""
    devices = answer.get("devices")
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise ServiceError("the service's device list did not answer with FedMQ's JSON")
    return devices


def _show(args: argparse.Namespace, answer: dict[str, Any], summary: str) -> int:
    print(json.dumps(answer, indent=2) if args.json else summary)
    return 0


def _call(
    settings: Settings, method: str, path: str, body: Any, token: str | None
) -> dict[str, Any]:
    return RestClient(settings.server_url, token).json(method, path, body)


def ago(seconds: float) -> str:
    """Return an age for people: ``just now``, ``42 s ago``, ``5 min ago``, ``3 h ago``..."""
    if seconds < 1:
        return "just now"
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


__all__ = ["add_devices_command"]
