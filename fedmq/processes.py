"""`fedmq server`, `worker`, `bridge` and `fleet`: one component per process.

Each is a context that builds its component through ``fedmq.components``
(as the in-process runs do) and a ``run_*`` that holds it until signalled.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator_service import ServiceError
from broker.access import open_access
from broker.bridge import Bridge
from broker.identity import KeyRing
from broker.probe import BrokerProbe
from broker.topics import DEFAULT_NAMESPACE
from device_sdk.emulator import Fleet
from device_sdk.emulator.fleet import fleet_transports
from device_sdk.emulator.profiles import TraceProfile, load_profile
from device_sdk.emulator.traces import AvailabilityDriver
from fedmq import components
from fedmq.argtypes import UsageError
from fedmq.enrollment import Enrollment, fetch_experiment
from fedmq.http_server import HttpServer
from fedmq.keys import KeyFolder
from fedmq.platforms import assign_platforms, mixed_trainers
from fedmq.settings import Settings, redact
from fedmq.wiring import Ticker, TransportPool, executor_runner, unique_client_id
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


def check_health_file(health_file: Path | None) -> None:
    """Write ``health_file`` now, so a path no one can write stops the command before it starts.

    Otherwise the first touch comes from ``wait_for_signal``, with the process
    already connected and a traceback instead of a line. The file is dated
    1970: a health check (modified within 30 s) fails until the process is up.
    """
    if health_file is None:
        return
    try:
        health_file.touch()
        os.utime(health_file, (0, 0))
    except OSError as exc:
        raise UsageError(
            f"--health-file {health_file}: cannot write it: {exc.strerror or exc}"
        ) from None


@contextmanager
def serving(
    settings: Settings,
    *,
    host: str,
    port: int,
    public_url: str | None = None,
    recovery_grace_s: float = 60.0,
) -> Iterator[int]:
    """Serve the REST API and coordinate rounds while the context lasts; yield the bound port."""
    # Here, not at the top: a worker or fleet process needs no database or HTTP layer.
    from aggregator_service import Database
    from aggregator_service.api.metrics import LinkCounters
    from aggregator_service.rounds.registry import DeviceRegistry

    keys = KeyFolder(settings.key_folder)
    identity = keys.service_identity()
    # Per-device broker users, provisioned at registration (see broker.access).
    access = open_access(settings.broker_access_url) if settings.broker_access_url else None
    with ExitStack() as stack:
        transports = TransportPool(settings.broker_url)
        stack.callback(transports.close)
        transport = transports(unique_client_id("coordinator"))
        store = open_store(settings.store_url)
        db = Database(settings.db_url)
        stack.callback(db.close)
        coordinator = components.build_coordinator(
            transport,
            store,
            db,
            settings,
            identity=identity,
            # Re-read on an unknown sender: a worker started later is trusted at once.
            worker_keys=KeyRing(reload=keys.worker_keys, stamp=keys.worker_keys_stamp),
            registry=DeviceRegistry(db, access=access),
            public_url=public_url or f"http://{_reachable(host)}:{port}",
        )
        service = coordinator.service
        token = settings.admin_token or _generated_token(settings.home)
        app = components.build_app(coordinator, store, settings, admin_token=token)
        link = LinkCounters()
        transport.on_reconnect(link.reconnected)
        app.extensions["fedmq.link"] = link  # /metrics counts the reconnects
        app.extensions["fedmq.broker_probe"] = BrokerProbe(settings.broker_url)  # /ready asks it
        # Bound before the coordinator starts: a second server on a port in use stops
        # here, before it recovers (and resends) the running server's rounds.
        server = HttpServer(app, host, port)
        stack.callback(server.shutdown)  # frees the port if the coordinator fails to start
        service.start(recovery_grace_s=recovery_grace_s)
        stack.callback(service.close)  # the last-seen times still in memory; before the database
        stack.callback(Ticker(service.tick).start().stop)
        server.start()
        stack.callback(server.shutdown)  # at the end, first: no request meets a closed service
        print(
            f"fedmq server on http://{host}:{server.port} (broker {redact(settings.broker_url)})",
            flush=True,
        )
        yield server.port


def run_server(
    settings: Settings,
    *,
    host: str,
    port: int,
    public_url: str | None = None,
    recovery_grace_s: float = 60.0,
) -> None:
    """Serve the REST API and coordinate rounds until signalled."""
    with serving(
        settings, host=host, port=port, public_url=public_url, recovery_grace_s=recovery_grace_s
    ):
        wait_for_signal()


@contextmanager
def working(settings: Settings, *, name: str, checkpoint_every: int = 32) -> Iterator[None]:
    """Aggregate updates while the context lasts.

    ``name`` is the worker's MQTT client id: a restarted worker with the same
    name resumes its session, and with it the updates it had not acked. More
    intake comes from more workers in the same group (``settings``), each
    with a name of its own: they share every round and one of them combines it.
    """
    keys = KeyFolder(settings.key_folder)
    service_key = keys.service_key()  # fail at once, in one line, when it is not here
    with ExitStack() as stack:
        transports = TransportPool(settings.broker_url)
        stack.callback(transports.close)
        worker = components.build_worker(
            transports(name),
            open_store(settings.store_url),
            settings,
            identity=keys.worker_identity(name),
            service_key=service_key,
            checkpoint_every=checkpoint_every,
        )
        worker.start()
        stack.callback(worker.stop)  # its heartbeat, before the transport it beats on
        print(f"fedmq worker on {redact(settings.broker_url)}", flush=True)
        yield


def run_worker(
    settings: Settings,
    *,
    name: str,
    checkpoint_every: int = 32,
    health_file: Path | None = None,
) -> None:
    """Aggregate updates until signalled (see ``working``)."""
    check_health_file(health_file)
    with working(settings, name=name, checkpoint_every=checkpoint_every):
        wait_for_signal(health_file)


def run_bridge(
    settings: Settings,
    *,
    region: str,
    name: str,
    health_file: Path | None = None,
) -> None:
    """Carry a region's device and round traffic to and from the root's broker until signalled.

    The root is the settings' broker; the region's devices and edge workers
    use ``region``. See ``broker.bridge`` for what crosses and why updates
    never do.
    """
    check_health_file(health_file)
    root = settings.broker_url
    roots, regions = TransportPool(root), TransportPool(region)
    try:
        # One id per side, each stable so a restarted bridge resumes its sessions: with a
        # single id, a region and root on one broker take each other's connection over.
        client_id = f"fedmq-bridge-{name}"
        bridge = Bridge(
            roots(f"{client_id}-root"),
            regions(f"{client_id}-region"),
            name=name,
            topics=settings.topics,
        )
        bridge.start()
        print(f"fedmq bridge {name}: {redact(region)} <-> {redact(root)}", flush=True)
        wait_for_signal(health_file)
        bridge.stop()
    finally:
        regions.close()
        roots.close()


def default_prefix(namespace: str) -> str:
    """Return a fleet's device id prefix: ``emu``, or ``<namespace>-emu`` in a namespace of its own.

    A device's id is its MQTT client id, and client ids are broker-wide: two
    deployments sharing a broker, each with an ``emu-0000``, would take each
    other's connection over and over, namespaces or not.
    """
    return "emu" if namespace == DEFAULT_NAMESPACE else f"{namespace}-emu"


@dataclass(frozen=True)
class FleetOptions:
    """What ``fedmq fleet`` runs: which devices, how fast, on which platforms."""

    devices: int
    experiment_id: str | None = None
    seed: int | None = None
    """The partition seed (default: the experiment's)."""
    first: int = 0
    prefix: str | None = None
    """Device ids are ``<prefix>-0000``, ...; None: ``default_prefix`` of the namespace."""
    concurrency: int = 2
    heartbeat_s: float = 30.0
    platforms: Mapping[str, float] = field(default_factory=lambda: {"python": 1.0})
    profile: str | None = None


@contextmanager
def fleet_running(settings: Settings, options: FleetOptions) -> Iterator[Fleet]:
    """Run emulated devices for an experiment of the settings' service while the context lasts.

    ``options.platforms`` shares the experiment's devices among platforms
    (contiguous blocks of device indices, see ``assign_platforms``); the model
    must be packaged for each of them (``model.platforms``).
    ``options.profile`` names the devices' speeds
    (``device_sdk.emulator.profiles``): slowed devices sleep out their
    delays, each on a thread of its own.
    """
    experiment, assigned = _experiment_for(settings, options)
    config = experiment["config"]
    size, first, last = len(assigned), options.first, options.first + options.devices
    seed = config["seed"] if options.seed is None else options.seed
    make_trainer, names = mixed_trainers(assigned, seed)
    speed = None
    concurrency = options.concurrency
    if options.profile is not None:
        speed = load_profile(options.profile, seed=seed, devices=size)
        concurrency = max(concurrency, options.devices)  # a sleeping device holds its thread
    enrollment = Enrollment(settings)
    transports = fleet_transports(settings.broker_url, devices=options.devices)
    executor = ThreadPoolExecutor(concurrency, thread_name_prefix="fedmq-train")
    fleet: Fleet | None = None
    try:
        fleet = components.build_fleet(
            lambda client_id, will: transports(client_id, will, enrollment.logins.get(client_id)),
            config["data"],
            settings,
            seed=seed,
            indices=range(first, last),
            experiment_id=experiment["id"],
            run=executor_runner(executor),
            prefix=options.prefix or default_prefix(settings.namespace),
            make_trainer=make_trainer,
            platforms=names,
            speed=speed,
            enroll=enrollment,
            identities=KeyFolder(settings.key_folder).device_identity,
        )
        driver = None
        if isinstance(speed, TraceProfile):
            # Devices leave and rejoin as their availability windows say.
            driver = AvailabilityDriver(speed.trace, speed.wall_clock)
        fleet.start(heartbeat_s=options.heartbeat_s, online=driver.is_online if driver else None)
        if driver is not None:
            driver.attach(fleet.devices, first=first)
        where = redact(settings.broker_url)
        print(
            f"fedmq fleet: {options.devices} devices for {experiment['id']} on {where}",
            flush=True,
        )
        if speed is not None:
            tiers = speed.summary(range(first, last))
            print(f"fedmq fleet: speed profile {speed.name}: {tiers}", flush=True)
        yield fleet
    finally:
        if fleet is not None:
            fleet.stop()
        if isinstance(speed, TraceProfile):
            speed.wall_clock.close()
        executor.shutdown(wait=False, cancel_futures=True)
        transports.close()
        if fleet is not None:
            print(f"fedmq fleet stopped: {fleet.summary()}", flush=True)


def run_fleet(
    settings: Settings, options: FleetOptions, *, health_file: Path | None = None
) -> None:
    """Run emulated devices for an experiment until signalled (see ``fleet_running``)."""
    check_health_file(health_file)
    with fleet_running(settings, options):
        wait_for_signal(health_file)


def _experiment_for(settings: Settings, options: FleetOptions) -> tuple[dict[str, Any], list[str]]:
    """Fetch the fleet's experiment; check its devices exist and their platforms are packaged.

    Returns the experiment and the platform of each of its devices.
    """
    experiment = fetch_experiment(settings, options.experiment_id)
    config = experiment["config"]
    size = int(config["data"]["devices"])
    first, last = options.first, options.first + options.devices
    if last > size:
        raise ServiceError(
            f"the experiment partitions its data for {size} devices; "
            f"devices {first}..{last - 1} do not exist"
        )
    assigned = assign_platforms(options.platforms, size)
    packaged = set(config["model"].get("platforms", [])) | {"python"}
    unpackaged = sorted(set(assigned[first:last]) - packaged)
    if unpackaged:
        raise ServiceError(
            f"experiment {experiment['id']} is not packaged for {unpackaged}: "
            "add them to its model.platforms"
        )
    return experiment, assigned


def _generated_token(home: Path) -> str:
    """Create an admin token in ``home``, readable only by this user, and say where it is."""
    path = home / "admin-token"
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
