"""In-process compositions: service, worker and an emulated fleet wired in one process."""

from __future__ import annotations

import secrets
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from aggregator_service import ConfigError, Database, ExperimentConfig, RoundService
from aggregator_service.persistence import RoundRecord
from broker import MemoryTransport, Transport
from broker.bridge import Bridge
from broker.connect import is_in_process
from broker.identity import SERVICE_NAME, Identity, KeyRing
from broker.transport import Will
from device_sdk.emulator import Fleet, TrainerFactory
from device_sdk.emulator.fleet import Enroll, TransportFor
from device_sdk.emulator.profiles import SpeedProfile, TraceProfile, VirtualTime
from device_sdk.emulator.traces import AvailabilityDriver
from device_sdk.secagg import Vanish
from fedmq import components
from fedmq.drive import (
    EMULATED_TICK_S,
    Progress,
    RoundCounter,
    run_emulated,
    wait_for_devices,
    wait_for_rounds,
)
from fedmq.settings import Settings
from fedmq.wiring import (
    Ticker,
    TransportPool,
    executor_runner,
    free_port,
    start_http,
    unique_client_id,
)
from model_store import LocalStore, ModelStore, open_store


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced."""

    experiment_id: str
    config: ExperimentConfig
    rounds: list[RoundRecord]
    initial_weights: bytes
    final_weights: bytes
    wall_time_s: float
    fleet: dict[str, int]
    """The fleet's totals: tasks, updates sent, uploads (claim checks), failures, rejections."""

    @property
    def final_metrics(self) -> dict[str, float]:
        """Return the metrics of the last committed round (empty if none committed)."""
        done = [r for r in self.rounds if r.state == "committed"]
        return dict(done[-1].metrics) if done else {}


def simulate(
    config: ExperimentConfig,
    *,
    rounds: int | None = None,
    workdir: Path | None = None,
    progress: Progress | None = None,
    stop_when: Callable[[RoundRecord], bool] | None = None,
    profile: SpeedProfile | None = None,
    workers: int = 1,
    regions: int = 1,
    settings: Settings | None = None,
    vanish: Mapping[int, Vanish] | None = None,
) -> RunResult:
    """Run an experiment on the in-process bus: deterministic for a config and seed.

    Parameters
    ----------
    config
        The experiment to run.
    rounds
        How many rounds (default: ``config.rounds.count``).
    workdir
        Where the model store lives (default: a temporary folder).
    progress
        Called with each round's record as the round ends.
    stop_when
        End early after the first round for which this returns True.
    profile
        Device speeds: the run then goes in emulated time (a 1x device's
        training lasts one emulated second; round timings are emulated
        seconds), still deterministic.
    workers
        Aggregator workers sharing the update queue, each folding its share
        (per region, with ``regions``).
    regions
        Run an aggregation tree: this many regions, each its own bus with its
        share of the devices and its edge workers, bridged to the root, whose
        one worker combines the regions' partials.
    settings
        The store (default: a folder in ``workdir``), data folders, namespace
        and limits (default: ``Settings()``, the embedded defaults).
    vanish
        Devices (by index) that drop out of secure rounds at a stage.

    Returns
    -------
    RunResult
        The experiment id, every round's record, and the initial and final weights.
    """
    return run_experiment(
        config,
        rounds=rounds,
        workdir=workdir,
        progress=progress,
        stop_when=stop_when,
        profile=profile,
        workers=workers,
        regions=regions,
        settings=settings,
        vanish=vanish,
    )


def run_experiment(
    config: ExperimentConfig,
    *,
    broker_url: str = "memory://",
    rounds: int | None = None,
    workdir: Path | None = None,
    progress: Progress | None = None,
    timeout_s: float | None = None,
    make_trainer: TrainerFactory | None = None,
    evaluate: bool = True,
    stop_when: Callable[[RoundRecord], bool] | None = None,
    profile: SpeedProfile | None = None,
    workers: int = 1,
    regions: int = 1,
    settings: Settings | None = None,
    vanish: Mapping[int, Vanish] | None = None,
) -> RunResult:
    """Run service, workers and fleet in this process over ``broker_url``.

    On ``memory://`` one dispatcher thread delivers every message in publish
    order, so the run is a deterministic function of config and seed. On a
    real broker each component opens its own connection (each device its own
    MQTT session) exactly as separate processes would. ``make_trainer`` swaps
    the devices' trainer (benchmarks use a no-op one); ``evaluate=False``
    skips the held-out evaluation of each version. ``stop_when`` ends the run
    early, after the first round for which it returns True (e.g. a target
    accuracy reached). ``profile`` slows devices down: in emulated time on
    ``memory://`` (``VirtualTime``: trainings complete in the order of their
    emulated durations, the coordinator's clock reads emulated seconds), by
    real sleeps on a real broker. ``workers`` aggregator workers share the
    update queue, each folding its share of every round.

    ``regions`` > 1 (``memory://`` only) runs an aggregation tree: each region
    is a bus of its own with its share of the devices and ``workers`` edge
    workers, bridged to the root bus (``broker.bridge``), where the
    coordinator and one root worker, which combines, run.

    The components are built as ``fedmq server``, ``worker`` and ``fleet``
    build theirs (``fedmq.components``) from ``settings``: a store given there
    (default: a folder in ``workdir``) is used with the same artifact links,
    e.g. an S3 store's presigned URLs. The database stays in memory.
    """
    settings = settings or Settings()
    if regions > 1 and not is_in_process(broker_url):
        raise ConfigError(
            "regions are emulated on memory:// only; on brokers, run `fedmq bridge` per region"
        )
    started = time.perf_counter()
    count = rounds or config.rounds.count
    in_process = is_in_process(broker_url)
    ended = RoundCounter(count, progress, stop_when)
    virtual = None
    if in_process and profile is not None:
        virtual = VirtualTime(
            max_step_s=None if isinstance(profile, TraceProfile) else EMULATED_TICK_S
        )
    with ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmq-")))
        store = open_store(settings.store) if settings.store else LocalStore(root / "store")
        db = Database("sqlite://")
        stack.callback(db.close)
        # This run's devices live only as long as the run: short MQTT sessions.
        track = TransportPool(broker_url, session_expiry_s=60)
        stack.callback(track.close)
        # Every party signs with a key of its own, made for this run.
        service_identity = Identity.generate(SERVICE_NAME)
        edges = workers * regions if regions > 1 else 0
        roots = 1 if edges else workers
        aggregators = [Identity.generate(unique_client_id("worker")) for _ in range(roots + edges)]
        region_pools = [TransportPool(broker_url) for _ in range(regions if edges else 0)]
        for pool in region_pools:
            stack.callback(pool.close)
        service = _coordinator(
            stack,
            track,
            store,
            db,
            settings,
            service_identity,
            KeyRing({w.name: w.public_key for w in aggregators}),
            in_process=in_process,
            evaluate=evaluate,
            clock=virtual,
        )
        service.add_listener(ended)
        service.start()
        # A private update queue: this run's workers must not share a broker-wide
        # group with other deployments' workers.
        group = unique_client_id("aggregators")
        # In a tree, the root's one worker combines and the regions' edge workers fold.
        placed = [track] * roots
        placed += [pool for pool in region_pools for _ in range(workers)]
        for worker, pool in zip(aggregators, placed, strict=True):
            running = components.build_worker(
                pool(worker.name),
                store,
                settings,
                identity=worker,
                service_key=service_identity.public_key,
                group=group,
            )
            running.start()
            stack.callback(running.stop)
        for number, pool in enumerate(region_pools):
            bridge = Bridge(
                track("bridge"), pool("bridge"), name=f"region{number}", topics=settings.topics
            )
            bridge.start()
        experiment_id = service.create_experiment(config)
        ended.on_stop = lambda: service.stop_after_current_round(experiment_id)
        fleet = _fleet(
            stack,
            _spread(region_pools) if region_pools else track,
            settings,
            config,
            experiment_id,
            in_process,
            make_trainer,
            profile,
            virtual,
            enroll=lambda identity, platform: _enroll(service, identity, platform),
            vanish=vanish,
        )
        fleet.start()
        if virtual is not None:
            stack.callback(virtual.close)  # ends tasks still waiting in emulated time
        if isinstance(profile, TraceProfile):
            # Devices leave and rejoin the pool as their availability windows say.
            clock = virtual if virtual is not None else profile.wall_clock
            AvailabilityDriver(profile.trace, clock).attach(fleet.devices)
            if virtual is None:
                stack.callback(profile.wall_clock.close)
        buses = [
            bus
            for pool in (track, *region_pools)
            for bus in pool.opened
            if isinstance(bus, MemoryTransport)
        ]
        wait_for_devices(service, len(fleet.devices), buses, timeout_s)
        service.request_rounds(experiment_id, count)
        if not in_process or (vanish and virtual is None):
            # Devices that vanish mid-protocol are given up on when a stage times out.
            stack.callback(Ticker(service.tick).start().stop)
        if virtual is not None:
            run_emulated(virtual, ended, buses, service.tick, config, timeout_s)
        else:
            wait_for_rounds(ended, buses, timeout_s)
        _, initial = service.model_weights(experiment_id, 0)
        _, final = service.model_weights(experiment_id)
        elapsed = time.perf_counter() - started
        return RunResult(
            experiment_id,
            config,
            service.rounds(experiment_id),
            initial,
            final,
            elapsed,
            fleet.summary(),
        )


def _enroll(service: RoundService, identity: Identity, platform: str) -> bytes:
    """Register an in-process device's identity with the coordinator; return its key."""
    service.register_device(platform, public_key=identity.public_key_text, device_id=identity.name)
    return service.public_key


def _coordinator(
    stack: ExitStack,
    track: TransportPool,
    store: ModelStore,
    db: Database,
    settings: Settings,
    identity: Identity,
    worker_keys: KeyRing,
    *,
    in_process: bool,
    evaluate: bool,
    clock: Callable[[], float] | None = None,
) -> RoundService:
    """Build the coordinator; off the in-process bus, with its HTTP service.

    Devices then reach the store as they would remotely: signed URLs served
    over HTTP (or the object store's presigned ones), and large updates
    uploaded, not inlined.
    """
    port = None if in_process else free_port()
    coordinator = components.build_coordinator(
        track(unique_client_id("coordinator")),
        store,
        db,
        settings,
        identity=identity,
        worker_keys=worker_keys,
        public_url=None if port is None else f"http://127.0.0.1:{port}",
        evaluate=evaluate,
        clock=clock or time.time,
    )
    if port is not None:
        token = settings.admin_token or secrets.token_urlsafe(24)
        app = components.build_app(coordinator, store, settings, admin_token=token)
        stack.callback(start_http(app, "127.0.0.1", port).shutdown)
    return coordinator.service


def _fleet(
    stack: ExitStack,
    track: TransportFor,
    settings: Settings,
    config: ExperimentConfig,
    experiment_id: str,
    in_process: bool,
    make_trainer: TrainerFactory | None,
    profile: SpeedProfile | None = None,
    virtual_time: VirtualTime | None = None,
    *,
    enroll: Enroll,
    vanish: Mapping[int, Vanish] | None = None,
) -> Fleet:
    """Build the emulated fleet of the experiment's data section."""
    run = None
    if not in_process:
        # Slowed devices sleep out their delays on the pool: a thread for each.
        threads = 2 if profile is None else max(2, config.data.devices)
        executor = ThreadPoolExecutor(threads, thread_name_prefix="fedmq-train")
        stack.callback(executor.shutdown, wait=True, cancel_futures=True)
        run = executor_runner(executor)
    fleet = components.build_fleet(
        track,
        config.to_dict()["data"],
        settings,
        seed=config.seed,
        experiment_id=experiment_id,
        run=run,
        make_trainer=make_trainer,
        speed=profile,
        virtual_time=virtual_time,
        enroll=enroll,
        # Fresh ids per run, so no broker session of an earlier run is resumed.
        prefix="emu" if in_process else f"emu{uuid.uuid4().hex[:4]}",
        vanish=vanish,
    )
    # The run's end drops the devices' pending come-back-later check-ins: they
    # would fire later on transports already closed.
    stack.callback(fleet.scheduler.close)
    return fleet


def _spread(pools: list[TransportPool]) -> TransportFor:
    """Return an opener that places each new device on the next region's bus, in turn."""
    placed: dict[str, TransportPool] = {}

    def open_in_region(client_id: str, will: Will | None = None) -> Transport:
        pool = placed.setdefault(client_id, pools[len(placed) % len(pools)])
        return pool(client_id, will)

    return open_in_region
