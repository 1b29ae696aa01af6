"""An emulated fleet: N devices in one process, each with its own partition of a data set."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from broker import BrokerError, CheckOut, Transport, encode
from broker.identity import Identity
from broker.topics import Topics
from device_sdk.app import DeviceApp, TrainHandler
from device_sdk.client import DeviceClient
from device_sdk.data import DataDirs, load_dataset, partition
from device_sdk.emulator._trace_pacing import TaskAbandoned
from device_sdk.emulator.profiles import SpeedProfile, VirtualTime, paced
from device_sdk.fetch import ArtifactFetcher
from device_sdk.scheduler import Scheduler
from device_sdk.secagg import Vanish
from device_sdk.trainers.torchscript import ModuleCache, TorchScriptTrainer

if TYPE_CHECKING:
    from broker.mqtt_hub import HubPool

log = logging.getLogger(__name__)

Runner = Callable[[Callable[[], None]], None]
TransportFor = Callable[[str, tuple[str, bytes] | None], Transport]
"""Returns the transport a device speaks on, by client id and last will (topic, signed frame)."""
Enroll = Callable[[Identity, str], bytes]
"""Registers a device's identity for a platform; returns the service key to pin."""
TrainerFactory = Callable[[np.ndarray, np.ndarray, int], TrainHandler]
"""Builds device ``i``'s training handler from its examples, labels and index."""


def torchscript_trainers(seed: int) -> TrainerFactory:
    """Return a factory of TorchScript trainers sharing one loaded-module cache."""
    import torch

    # One intra-op thread per training: a fleet trains devices side by side,
    # and a fixed thread count keeps float results identical across runs.
    torch.set_num_threads(1)
    modules = ModuleCache()

    def make(x: np.ndarray, y: np.ndarray, index: int) -> TrainHandler:
        return TorchScriptTrainer(x, y, seed=seed, stream=index, modules=modules)

    return make


def fleet_transports(
    broker_url: str,
    *,
    session_expiry_s: int | None = None,
    max_connecting: int = 64,
    workers: int = 4,
    devices: int | None = None,
) -> HubPool:
    """Return the transports of a fleet's devices: over MQTT, all of them on one hub.

    The pool is called like a ``TransportFor`` (``pool(device_id, will)``, plus
    an optional broker login) and closed with ``close()``. Over ``mqtt://``
    every device is a client of one ``broker.mqtt_hub.MqttHub``: a handful of
    threads for the whole fleet (one network thread, ``workers`` for the
    devices' message handlers) and about 25 KiB per device in all (measured by
    ``experiments.bench.fleet_memory``), where a transport of its own costs
    each device two threads and about 75 KiB; other schemes open a transport
    per device as before.

    Parameters
    ----------
    broker_url
        The broker the devices connect to.
    session_expiry_s
        How long the broker keeps the session of a device that went away.
    max_connecting
        Devices connecting at once (Mosquitto's listen backlog is 100).
    workers
        Threads running the devices' handlers; training itself runs where the
        fleet's ``run`` puts it.
    devices
        How many devices the fleet will run: refused at once, with what to do,
        when the process cannot open that many sockets.

    Raises
    ------
    TransportError
        ``devices`` devices do not fit under the process's open-files limit.
    """
    from broker.mqtt_hub import HubPool  # paho, only in a process that uses it

    pool = HubPool(
        broker_url,
        session_expiry_s=session_expiry_s,
        max_connecting=max_connecting,
        workers=workers,
        name="fedmq-fleet-hub",
    )
    if devices is not None and pool.hub is not None:
        try:
            pool.hub.check_room(devices)
        except BrokerError:
            pool.close()
            raise
    return pool


def device_name(index: int, prefix: str = "emu") -> str:
    """Return the id of the fleet's ``index``-th device; the index fixes its data."""
    return f"{prefix}-{index:04d}"


class Fleet:
    """Emulated devices sharing one artifact cache and one loaded-module cache.

    Device ``i`` holds partition ``i`` of the experiment's data set and seeds
    its batch order with ``i``, so the same device trains on the same examples
    the same way in every run and every process.

    Parameters
    ----------
    transport_for
        The transport each device uses, by device id.
    data
        The experiment config's ``data`` section (dataset, devices, partition, alpha, ...).
    seed
        The experiment's seed: fixes the partition and the devices' batch order.
    indices
        Which of the partition's devices to run (default: all of them).
    experiment_id
        Restrict the devices to one experiment.
    run
        Where devices train (default: on the delivering thread).
    prefix
        Device ids are ``<prefix>-0000``, ``<prefix>-0001``, ...
    make_trainer
        Builds each device's training handler (default: the TorchScript trainer).
    platforms
        Device ``i``'s platform (``python``, ``android``, ``ios``), reported at
        check-in as ``emulated-<platform>``; ``make_trainer`` must match it.
    speed
        Slows devices down (``device_sdk.emulator.profiles``): each sleeps out
        its delay after training, or, with ``virtual_time``, completes after its
        emulated duration.
    virtual_time
        Emulated time of an in-process run (its runners replace ``run``).
    enroll
        Registers each device's identity before it goes online; the service
        key it returns is the one the device pins.
    topics
        The deployment's topics (its namespace).
    identities
        Keeps each device's key (by id) across runs; default: a fresh key per run.
    scheduler
        Runs the devices' delayed check-ins (``ComeBackLater``); default: one
        thread for the whole fleet, stopped by ``stop``.
    data_dir
        The folders searched for the data set's files (``mnist``), from the
        caller's settings.
    vanish
        Devices (by partition index) that drop out of secure rounds, and at
        which stage (``device_sdk.secagg.Vanish``): dropout tests.
    """

    def __init__(
        self,
        transport_for: TransportFor,
        data: Mapping[str, Any],
        *,
        seed: int,
        indices: range | None = None,
        experiment_id: str | None = None,
        fetcher: ArtifactFetcher | None = None,
        run: Runner | None = None,
        prefix: str = "emu",
        make_trainer: TrainerFactory | None = None,
        platforms: Sequence[str] | None = None,
        speed: SpeedProfile | None = None,
        virtual_time: VirtualTime | None = None,
        enroll: Enroll,
        topics: Topics | None = None,
        identities: Callable[[str], Identity] = Identity.generate,
        scheduler: Scheduler | None = None,
        data_dir: DataDirs = None,
        vanish: Mapping[int, Vanish] | None = None,
    ) -> None:
        topics = topics or Topics()
        vanish = vanish or {}
        dataset = load_dataset(str(data.get("dataset", "digits")), data_dir=data_dir)
        size = int(data.get("devices", 20))
        parts = partition(
            dataset.y_train,
            size,
            str(data.get("partition", "iid")),
            seed=seed,
            alpha=float(data.get("alpha", 0.5)),
            shards_per_device=int(data.get("shards_per_device", 2)),
        )
        self.fetcher = fetcher or ArtifactFetcher()
        make_trainer = make_trainer or torchscript_trainers(seed)
        self.devices: list[DeviceClient] = []
        self._stopped = threading.Event()
        self._own_scheduler = scheduler is None
        self.scheduler = scheduler or Scheduler("fedmq-fleet-scheduler")
        self.indices = list(indices if indices is not None else range(size))
        """The partition index of each device, in ``devices`` order."""
        self._online: Callable[[int], bool] = lambda index: True
        for i in self.indices:
            idx = parts[i]
            app = DeviceApp()
            trainer = make_trainer(dataset.x_train[idx], dataset.y_train[idx], i)
            trainer, device_run = paced(
                trainer, run, i, speed, virtual_time, sleep=self._sleep_unless_stopped
            )
            app.on_train(trainer)
            identity = identities(device_name(i, prefix))
            service_key = enroll(identity, "emulated")
            # Signed now, sent by the broker when the connection dies.
            will = CheckOut(device_id=identity.name, reason="connection lost")
            will_frame = (topics.checkin(identity.name), encode(will, identity))
            self.devices.append(
                DeviceClient(
                    app,
                    transport_for(identity.name, will_frame),
                    identity,
                    self.fetcher,
                    service_key=service_key,
                    topics=topics,
                    platform=f"emulated-{platforms[i]}" if platforms else "emulated",
                    experiment_id=experiment_id,
                    run=device_run,
                    examples=len(idx),
                    scheduler=self.scheduler,
                    vanish=vanish.get(i),
                )
            )

    def start(
        self, *, heartbeat_s: float | None = None, online: Callable[[int], bool] | None = None
    ) -> None:
        """Bring every device online; with ``heartbeat_s``, check them in again that often.

        Heartbeats keep a coordinator's pool of online devices current, also
        after the coordinator restarts and has forgotten who is online. They
        are spread over the interval: device ``i`` of ``n`` beats ``i / n`` of
        it after the first, so a large fleet sends a steady trickle.
        ``online`` says whether the fleet's device ``index`` is available now
        (a trace's windows): an away device skips its beats.
        """
        self._online = online or (lambda index: True)
        for device in self.devices:
            device.heartbeat_s = heartbeat_s or None
            device.start()
        if heartbeat_s:
            threading.Thread(
                target=self._heartbeat, args=(heartbeat_s,), name="fedmq-heartbeat", daemon=True
            ).start()

    def stop(self) -> None:
        """Stop the heartbeats and the delayed check-ins, and check every device out."""
        self._stopped.set()
        if self._own_scheduler:
            self.scheduler.close()
        for device in self.devices:
            device.stop()

    def _sleep_unless_stopped(self, seconds: float) -> None:
        # A slowed device sleeps out its delay on a thread the process waits for at
        # exit; a stopping fleet ends the sleep and the task with it, so a SIGTERM
        # stops the process now, not after its slowest device's delay.
        if self._stopped.wait(seconds):
            raise TaskAbandoned("the fleet stopped")

    def _heartbeat(self, interval_s: float) -> None:
        # One device at a time, each at its slot: thousands of QoS 1 check-ins
        # at once would queue behind one another at the broker and the coordinator.
        slot = interval_s / max(len(self.devices), 1)
        due = time.monotonic() + interval_s
        while True:
            for index, device in zip(self.indices, self.devices, strict=True):
                if self._stopped.wait(max(due - time.monotonic(), 0.0)):
                    return
                due += slot
                if not self._online(index):
                    continue  # away (its trace says): a beat would put it back in the pool
                try:
                    device.check_in()
                except Exception:  # a broker outage: the next beat tries again
                    log.warning("heartbeat check-in of %s failed", device.device_id)
            late = time.monotonic() - due
            if late > interval_s:  # a slow broker: start the next round afresh, not in a burst
                log.warning("fleet heartbeats %.1f s behind their %g s interval", late, interval_s)
                due = time.monotonic()

    def summary(self) -> dict[str, int]:
        """Return the fleet's totals: tasks, updates sent, uploads, failures, rejections, ..."""
        return {
            "devices": len(self.devices),
            "tasks": sum(d.stats.tasks for d in self.devices),
            "updates_sent": sum(d.stats.updates_sent for d in self.devices),
            "uploads": sum(d.stats.uploads for d in self.devices),
            "failures": sum(d.stats.failures for d in self.devices),
            "rejections": sum(len(d.stats.rejections) for d in self.devices),
            "refused": sum(sum(d.stats.refused.values()) for d in self.devices),
            "abandoned": sum(d.stats.abandoned for d in self.devices),
        }
