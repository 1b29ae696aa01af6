"""`fedmq devices`: enroll, list, rotate and revoke device identities on a live server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from aggregator_service import ServiceError
from broker.identity import Identity
from fedmq.rest import RestClient
from fedmq.settings import Settings, add_location_flags


def add_devices_command(sub: Any) -> None:
    """Add ``fedmq devices enroll|list|rotate|revoke`` to the command's subparsers."""
    devices = sub.add_parser("devices", help="enroll, list, rotate and revoke device identities")
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


def _enroll(args: argparse.Namespace, settings: Settings) -> int:
    identity = _new_key(args.key_file, args.device_id or "device")
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
    for device in answer["devices"]:
        seen = f"{device['last_seen']:.0f}" if device["last_seen"] else "-"
        state = "revoked" if device.get("revoked") else "active"
        print(
            f"{device['id']:<32} {device['platform']:<18} {device['rounds_served']:>6} "
            f"{seen:>12}  {state}"
        )
    return 0


def _rotate(args: argparse.Namespace, settings: Settings) -> int:
    identity = _new_key(args.key_file, args.device_id)
    path = f"/api/v1/devices/{args.device_id}/rotate"
    body = {"public_key": identity.public_key_text}
    answer = _call(settings, "POST", path, body, settings.admin_token)
    return _show(args, answer, f"rotated {args.device_id}; new key in {args.key_file}")


def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    path = f"/api/v1/devices/{args.device_id}"
    answer = _call(settings, "DELETE", path, None, settings.admin_token)
    return _show(args, answer, f"revoked {args.device_id}")


def _new_key(path: Path, name: str) -> Identity:
    if path.exists():
        raise ServiceError(f"{path} exists; choose a new file for the new key")
    return Identity.load_or_create(name, path)


def _show(args: argparse.Namespace, answer: dict[str, Any], summary: str) -> int:
    print(json.dumps(answer, indent=2) if args.json else summary)
    return 0


def _call(
    settings: Settings, method: str, path: str, body: Any, token: str | None
) -> dict[str, Any]:
    return RestClient(settings.server_url, token).json(method, path, body)


__all__ = ["add_devices_command"]
