"""`fedmq server`, `fedmq worker` and `fedmq fleet`: one component per process."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aggregator_service import AggregatorWorker, Database, RoundService, ServiceError
from aggregator_service.api.app import create_app
from aggregator_service.evaluation import held_out_evaluator
from aggregator_service.links import SignedLinks
from device_sdk.emulator import Fleet
from fedmq.settings import home, redact
from fedmq.wiring import (
    DEFAULT_MAX_INLINE_BYTES,
    Ticker,
    TransportPool,
    executor_runner,
    start_http,
    unique_client_id,
)
from model_store import open_store

log = logging.getLogger(__name__)


def wait_for_signal(health_file: Path | None = None) -> None:
    """Block until SIGINT or SIGTERM, touching ``health_file`` every 5 s meanwhile."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    beat = None
    if health_file is not None:
        health_file.touch()
        beat = Ticker(health_file.touch, interval_s=5.0).start()
    try:
        stop.wait()
    finally:
        if beat is not None:
            beat.stop()


def run_server(
    *,
    host: str,
    port: int,
    broker: str,
    store_url: str,
    db_url: str,
    public_url: str | None,
    recovery_grace_s: float = 0.0,
) -> None:
    """Serve the REST API and coordinate rounds until signalled."""
    transports = TransportPool(broker)
    transport = transports(unique_client_id("coordinator"))
    store = open_store(store_url)
    db = Database(db_url)
    key = os.environ.get("FEDMQ_SIGNING_KEY", "").encode() or secrets.token_bytes(32)
    links = SignedLinks(key, public_url or f"http://{_reachable(host)}:{port}")
    limit = int(os.environ.get("FEDMQ_MAX_INLINE_BYTES", DEFAULT_MAX_INLINE_BYTES))
    service = RoundService(
        transport,
        store,
        db,
        evaluator_factory=held_out_evaluator,
        links=links,
        max_inline_bytes=limit,
    )
    service.start(recovery_grace_s=recovery_grace_s)
    ticker = Ticker(service.tick).start()
    token = os.environ.get("FEDMQ_ADMIN_TOKEN") or _generated_token()
    app = create_app({"ADMIN_TOKEN": token}, service=service, store=store, links=links)
    server = start_http(app, host, port)
    print(f"fedmq server on http://{host}:{server.port} (broker {redact(broker)})", flush=True)
    try:
        wait_for_signal()
    finally:
        server.shutdown()
        ticker.stop()
        transports.close()
        db.close()


def run_worker(
    *,
    broker: str,
    store_url: str,
    group: str,
    name: str,
    checkpoint_every: int = 32,
    health_file: Path | None = None,
) -> None:
    """Aggregate updates until signalled.

    ``name`` is the worker's MQTT client id: a restarted worker with the same
    name resumes its session, and with it the updates it had not acked.
    """
    transports = TransportPool(broker)
    worker = AggregatorWorker(
        transports(name),
        open_store(store_url),
        name=name,
        group=group,
        checkpoint_every=checkpoint_every,
    )
    worker.start()
    print(f"fedmq worker on {redact(broker)}", flush=True)
    try:
        wait_for_signal(health_file)
    finally:
        transports.close()


def run_fleet(
    *,
    broker: str,
    server: str,
    devices: int,
    experiment_id: str | None,
    seed: int | None,
    first: int,
    prefix: str,
    concurrency: int,
    heartbeat_s: float = 30.0,
    health_file: Path | None = None,
) -> None:
    """Run emulated devices for an experiment until signalled."""
    experiment = _experiment(server, experiment_id)
    data = experiment["config"]["data"]
    if first + devices > int(data["devices"]):
        raise ServiceError(
            f"the experiment partitions its data for {data['devices']} devices; "
            f"devices {first}..{first + devices - 1} do not exist"
        )
    transports = TransportPool(broker)
    executor = ThreadPoolExecutor(concurrency, thread_name_prefix="fedmq-train")
    fleet = Fleet(
        transports,
        data,
        seed=experiment["config"]["seed"] if seed is None else seed,
        indices=range(first, first + devices),
        experiment_id=experiment["id"],
        run=executor_runner(executor),
        prefix=prefix,
    )
    fleet.start(heartbeat_s=heartbeat_s)
    print(f"fedmq fleet: {devices} devices for {experiment['id']} on {redact(broker)}", flush=True)
    try:
        wait_for_signal(health_file)
    finally:
        fleet.stop()
        executor.shutdown(wait=False, cancel_futures=True)
        transports.close()
        print(f"fedmq fleet stopped: {fleet.summary()}", flush=True)


def _experiment(server: str, experiment_id: str | None) -> dict[str, Any]:
    """Fetch an experiment (default: the newest) from the service's REST API."""
    path = f"/api/v1/experiments/{experiment_id}" if experiment_id else "/api/v1/experiments"
    try:
        with urllib.request.urlopen(server.rstrip("/") + path, timeout=10) as response:
            body: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise ServiceError(f"{server}{path}: HTTP {exc.code}") from exc
    except (OSError, ValueError) as exc:
        raise ServiceError(f"cannot reach the FedMQ service at {server}: {exc}") from exc
    if experiment_id:
        return body
    if not body["experiments"]:
        raise ServiceError(f"{server} has no experiments yet; create one or pass --experiment")
    newest: dict[str, Any] = body["experiments"][-1]
    return newest


def _generated_token() -> str:
    """Create an admin token, readable only by this user, and say where it is."""
    path = home() / "admin-token"
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(token + "\n")
    print(f"FEDMQ_ADMIN_TOKEN is not set; generated one in {path}", flush=True)
    return token


def _reachable(host: str) -> str:
    """Return an address devices can use for a server bound to ``host``."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
