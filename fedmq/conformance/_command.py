"""`fedmq conformance`: wait for an external device, play the service, print the report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from broker import connect
from broker.errors import IdentityError
from broker.identity import SERVICE_NAME, Identity, decode_public_key
from broker.topics import Topics
from fedmq.conformance._blobs import BlobServer
from fedmq.conformance._kit import Conformance, KitOptions
from fedmq.conformance._model import KitModel
from fedmq.conformance._report import Report
from fedmq.conformance._standin import ServiceStandIn
from fedmq.conformance._takeover import connection_taker
from fedmq.settings import Settings, redact

USAGE_ERROR = 2


def run_command(args: argparse.Namespace, settings: Settings, out: TextIO | None = None) -> int:
    """Run the kit against the device ``args`` names; return the exit status (0, 1, or 2).

    Parameters
    ----------
    args
        The parsed ``fedmq conformance`` flags: ``device_id``, ``device_key``,
        ``service_key``, ``platform``, ``timeout``, ``come_back_after``, ``http``
        (``HOST:PORT`` the artifact server listens on) and ``public_url``.
    settings
        The command's settings (broker URL and namespace).
    out
        Where the setup and the report are printed (default: standard output).

    Returns
    -------
    int
        0 when every check passed, 1 otherwise, 2 when the flags cannot be used.
    """
    out = out or sys.stdout
    try:
        device_key = _read_public_key(args.device_key)
        service = _service_identity(args.service_key)
        host, port = _listen_address(args.http)
    except (IdentityError, ValueError) as exc:
        print(f"fedmq conformance: {exc}", file=sys.stderr)
        return USAGE_ERROR
    model = KitModel.build(args.platform)
    options = KitOptions(timeout_s=args.timeout, come_back_after_s=args.come_back_after)
    blobs = BlobServer(host, port, args.public_url)
    try:
        report = _run(args, settings, service, device_key, model, blobs, options, out)
    finally:
        blobs.close()
    print(report.table(), file=out)
    return report.exit_status()


def _run(
    args: argparse.Namespace,
    settings: Settings,
    service: Identity,
    device_key: bytes,
    model: KitModel,
    blobs: BlobServer,
    options: KitOptions,
    out: TextIO,
) -> Report:
    topics = Topics(settings.namespace)
    transport = connect(settings.broker_url)
    try:
        standin = ServiceStandIn(transport, topics, service, args.device_id, device_key)
        take_over = connection_taker(settings.broker_url, args.device_id)
        kit = Conformance(standin, blobs, model, take_over=take_over, options=options)
        _print_setup(out, settings, topics, service, args.device_id, blobs.url, options)
        return kit.run()
    finally:
        transport.close()


def _print_setup(
    out: TextIO,
    settings: Settings,
    topics: Topics,
    service: Identity,
    device_id: str,
    artifacts_url: str,
    options: KitOptions,
) -> None:
    """Print what the device must be configured with, before the kit waits for it."""
    rows = [
        ("broker", redact(settings.broker_url)),
        ("namespace", topics.namespace),
        ("device id", device_id),
        ("service key", f"{service.public_key_text}  (pin it: tasks are signed with it)"),
        ("check in on", topics.checkin(device_id)),
        ("tasks on", topics.device(device_id)),
        ("answer on", f"{topics.namespace}/updates/<experiment_id>/{device_id}  (reply_to)"),
        ("artifacts", f"{artifacts_url}  (the device must reach it over HTTP)"),
    ]
    print("FedMQ conformance kit: configure the device under test with", file=out)
    for name, value in rows:
        print(f"  {name:<12} {value}", file=out)
    print(
        f"then start it; waiting up to {options.timeout_s:g} s for its check-in.",
        file=out,
        flush=True,
    )


def _read_public_key(path: Path) -> bytes:
    """Return the raw public key in ``path`` (base64 of 32 bytes, as registrations carry it)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise IdentityError(f"cannot read the device key {path}: {exc}") from exc
    return decode_public_key(text.strip())


def _service_identity(path: Path | None) -> Identity:
    """Return the kit's service identity: kept in ``path`` (made on first use), else a fresh one."""
    if path is None:
        return Identity.generate(SERVICE_NAME)
    return Identity.load_or_create(SERVICE_NAME, path)


def _listen_address(text: str) -> tuple[str, int]:
    """Return the host and port of ``HOST:PORT`` (port 0: any free port)."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--http takes HOST:PORT, not {text!r}")
    return host, int(port)
