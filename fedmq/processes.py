"""`fedmq server`, `fedmq worker` and `fedmq fleet`: one component per process."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aggregator_service import AggregatorWorker, Database, RoundService, ServiceError
from aggregator_service.api.app import create_app
from aggregator_service.api.metrics import LinkCounters
from aggregator_service.evaluation import held_out_evaluator
from aggregator_service.links import PresignedLinks, SignedLinks
from aggregator_service.rounds.registry import DeviceRegistry
from broker import Transport
from broker.access import DeviceCredentials, open_access
from broker.bridge import Bridge
from broker.identity import Identity, KeyRing, decode_public_key
from broker.probe import BrokerProbe
from broker.topics import Topics
from device_sdk.emulator import Fleet
from device_sdk.emulator.profiles import load_profile
from fedmq.keys import KeyFolder
from fedmq.platforms import assign_platforms, mixed_trainers, platform_packagers
from fedmq.rest import ENROLLER, VIEWER, RestClient, token_from
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
from model_store.store import PresignedAccess

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
    recovery_grace_s: float = 60.0,
    keys: KeyFolder | None = None,
    namespace: str = "fedmq",
) -> None:
    """Serve the REST API and coordinate rounds until signalled."""
    keys = keys or KeyFolder.default(home())
    identity = keys.service_identity()
    # Per-device broker users, provisioned at registration (FEDMQ_BROKER_ACCESS_URL:
    # mosquitto-dynsec://... or rabbitmq-http://...; see broker.access).
    access_url = os.environ.get("FEDMQ_BROKER_ACCESS_URL")
    access = open_access(access_url) if access_url else None
    transports = TransportPool(broker)
    transport = transports(unique_client_id("coordinator"))
    store = open_store(store_url)
    db = Database(db_url)
    registry = DeviceRegistry(db, access=access)
    key = os.environ.get("FEDMQ_SIGNING_KEY", "").encode() or secrets.token_bytes(32)
    links: SignedLinks | PresignedLinks
    if isinstance(store, PresignedAccess):  # devices talk to the object store directly
        links = PresignedLinks(store)
    else:
        links = SignedLinks(key, public_url or f"http://{_reachable(host)}:{port}")
    limit = int(os.environ.get("FEDMQ_MAX_INLINE_BYTES", DEFAULT_MAX_INLINE_BYTES))
    service = RoundService(
        transport,
        store,
        db,
        identity=identity,
        # Re-read on an unknown sender: a worker started later is trusted at once.
        worker_keys=KeyRing(reload=keys.worker_keys),
        topics=Topics(namespace),
        registry=registry,
        evaluator_factory=held_out_evaluator,
        links=links,
        packagers=platform_packagers(),
        max_inline_bytes=limit,
    )
    service.start(recovery_grace_s=recovery_grace_s)
    ticker = Ticker(service.tick).start()
    token = os.environ.get("FEDMQ_ADMIN_TOKEN") or _generated_token()
    # Only a local-folder store needs the service's own blob endpoints.
    served = links if isinstance(links, SignedLinks) else None
    app = create_app(
        {"ADMIN_TOKEN": token, "NAMESPACE": namespace},
        service=service,
        store=store,
        links=served,
    )
    link = LinkCounters()
    transport.on_reconnect(link.reconnected)
    app.extensions["fedmq.link"] = link  # /metrics counts the reconnects
    app.extensions["fedmq.broker_probe"] = BrokerProbe(broker)  # /ready asks it
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
    keys: KeyFolder | None = None,
    namespace: str = "fedmq",
) -> None:
    """Aggregate updates until signalled.

    ``name`` is the worker's MQTT client id: a restarted worker with the same
    name resumes its session, and with it the updates it had not acked. More
    intake comes from more workers in the same ``group``, each with a name
    of its own: they share every round and one of them combines it.
    """
    keys = keys or KeyFolder.default(home())
    keys.service_key()  # fail at once, in one line, when the service key is not here
    transports = TransportPool(broker)
    try:
        start_worker(
            transports(name),
            store_url=store_url,
            name=name,
            group=group,
            checkpoint_every=checkpoint_every,
            keys_dir=str(keys.root),
            namespace=namespace,
        )
        print(f"fedmq worker on {redact(broker)}", flush=True)
        wait_for_signal(health_file)
    finally:
        transports.close()


def run_bridge(
    *,
    root: str,
    region: str,
    name: str,
    namespace: str = "fedmq",
    health_file: Path | None = None,
) -> None:
    """Carry a region's device and round traffic to and from the root's broker until signalled.

    The region's devices and edge workers use the region's broker; see
    ``broker.bridge`` for what crosses and why updates never do.
    """
    roots, regions = TransportPool(root), TransportPool(region)
    try:
        client_id = f"fedmq-bridge-{name}"
        bridge = Bridge(roots(client_id), regions(client_id), name=name, topics=Topics(namespace))
        bridge.start()
        print(f"fedmq bridge {name}: {redact(region)} <-> {redact(root)}", flush=True)
        wait_for_signal(health_file)
        bridge.stop()
    finally:
        regions.close()
        roots.close()


def start_worker(
    transport: Transport,
    *,
    store_url: str,
    name: str,
    group: str,
    checkpoint_every: int,
    keys_dir: str,
    namespace: str,
) -> None:
    """Start an aggregator worker on ``transport``."""
    keys = KeyFolder(Path(keys_dir))
    AggregatorWorker(
        transport,
        open_store(store_url),
        identity=keys.worker_identity(name),
        service_key=keys.service_key(),
        topics=Topics(namespace),
        group=group,
        checkpoint_every=checkpoint_every,
    ).start()


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
    platforms: Mapping[str, float] | None = None,
    profile: str | None = None,
    keys: KeyFolder | None = None,
    namespace: str = "fedmq",
) -> None:
    """Run emulated devices for an experiment until signalled.

    ``platforms`` shares the experiment's devices among platforms (contiguous
    blocks of device indices, see ``assign_platforms``); the model must be
    packaged for each of them (``model.platforms``). ``profile`` names the
    devices' speeds (``device_sdk.emulator.profiles``): slowed devices sleep
    out their delays, each on a thread of its own.
    """
    experiment = _experiment(server, experiment_id)
    data = experiment["config"]["data"]
    if first + devices > int(data["devices"]):
        raise ServiceError(
            f"the experiment partitions its data for {data['devices']} devices; "
            f"devices {first}..{first + devices - 1} do not exist"
        )
    seed = experiment["config"]["seed"] if seed is None else seed
    assigned = assign_platforms(platforms or {"python": 1.0}, int(data["devices"]))
    packaged = set(experiment["config"]["model"].get("platforms", [])) | {"python"}
    unpackaged = sorted(set(assigned[first : first + devices]) - packaged)
    if unpackaged:
        raise ServiceError(
            f"experiment {experiment['id']} is not packaged for {unpackaged}: "
            "add them to its model.platforms"
        )
    make_trainer, names = mixed_trainers(assigned, seed)
    speed = None
    if profile is not None:
        speed = load_profile(profile, seed=seed, devices=int(data["devices"]))
        concurrency = max(concurrency, devices)  # a sleeping device holds its thread
    transports = TransportPool(broker)
    executor = ThreadPoolExecutor(concurrency, thread_name_prefix="fedmq-train")
    enrollment = _Enrollment(server)
    folder = keys or KeyFolder.default(home())
    fleet = Fleet(
        lambda client_id, will: transports(client_id, will, enrollment.logins.get(client_id)),
        data,
        seed=seed,
        indices=range(first, first + devices),
        experiment_id=experiment["id"],
        run=executor_runner(executor),
        prefix=prefix,
        make_trainer=make_trainer,
        platforms=names,
        speed=speed,
        enroll=enrollment,
        topics=Topics(namespace),
        identities=folder.device_identity,
    )
    fleet.start(heartbeat_s=heartbeat_s)
    print(f"fedmq fleet: {devices} devices for {experiment['id']} on {redact(broker)}", flush=True)
    if speed is not None:
        tiers = speed.summary(range(first, first + devices))
        print(f"fedmq fleet: speed profile {speed.name}: {tiers}", flush=True)
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
    body = RestClient(server, token_from(VIEWER)).json("GET", path)
    if experiment_id:
        return body
    if not body["experiments"]:
        raise ServiceError(f"{server} has no experiments yet; create one or pass --experiment")
    newest: dict[str, Any] = body["experiments"][-1]
    return newest


class _Enrollment:
    """Registers a fleet's devices with the service over REST, pinning the key it answers with."""

    def __init__(self, server: str) -> None:
        token = token_from(ENROLLER)
        if not token:
            raise ServiceError(
                "enrolling devices needs FEDMQ_ENROLLMENT_TOKEN (or FEDMQ_ADMIN_TOKEN)"
            )
        self._api = RestClient(server, token)
        self.service_key: bytes | None = None
        self.logins: dict[str, DeviceCredentials] = {}
        """Each device's own broker user, where the service provisions them."""

    def __call__(self, identity: Identity, platform: str) -> bytes:
        """Register ``identity``; keep its broker login; return the service key reported."""
        body = {"platform": platform, "public_key": identity.public_key_text}
        answer = self._api.json("POST", "/api/v1/devices", {**body, "device_id": identity.name})
        key = decode_public_key(str(answer["service_key"]))
        login = answer.get("broker")
        if isinstance(login, dict):
            self.logins[identity.name] = DeviceCredentials(
                str(login["username"]), str(login["password"])
            )
        if self.service_key is not None and key != self.service_key:
            raise ServiceError("the service answered with two different keys; refusing both")
        self.service_key = key
        return key


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
