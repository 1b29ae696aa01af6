"""`fedmq devices run`: one Python edge device training on examples of its own.

An emulated fleet trains on a partition of a public data set; an edge device
(a gateway, a single-board computer, a lab machine) holds its own examples in
an ``.npz`` file. It keeps its key in a file, enrolls with it (again at each
start: the service answers with the key to pin and, where it provisions them,
the device's broker login), trains the model's TorchScript module, and checks
in every ``heartbeat_s`` so the coordinator keeps it in the online pool.
"""

from __future__ import annotations

import fcntl
import logging
import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aggregator_service import ServiceError
from broker import CheckOut, encode
from broker.identity import Identity
from broker.topics import is_valid_segment
from device_sdk import ArtifactFetcher, DeviceApp, DeviceClient
from device_sdk.data import load_examples
from device_sdk.trainers.torchscript import TorchScriptTrainer
from fedmq.devices import key_file
from fedmq.enrollment import Enrollment, fetch_experiment
from fedmq.processes import check_health_file, wait_for_signal
from fedmq.settings import Settings, redact
from fedmq.wiring import Ticker, TransportPool, executor_runner

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeOptions:
    """What ``fedmq devices run`` was asked for."""

    device_id: str
    key_file: Path
    """The device's private key (made here on first use, mode 0600); it never leaves the host."""
    data: Path
    """The device's examples: an ``.npz`` of ``x`` and ``y`` (``device_sdk.data.load_examples``)."""
    experiment_id: str | None = None
    """Take part in this experiment only (default: any the service selects it for)."""
    seed: int = 0
    """Seeds the batch order, with ``stream``."""
    stream: int | None = None
    """Separates this device's batch order from others with the same seed (default: from its id)."""
    heartbeat_s: float = 30.0


@contextmanager
def edge_device_running(settings: Settings, options: EdgeOptions) -> Iterator[DeviceClient]:
    """Run the device while the context lasts; it checks out when the context ends."""
    x, y = load_examples(options.data)
    if options.experiment_id is not None and settings.viewer_credential:
        check_examples_fit(fetch_experiment(settings, options.experiment_id), x, y)
    elif options.experiment_id is not None:
        log.warning(
            "no FEDMQ_VIEWER_TOKEN: the examples are not checked against %s's model; "
            "a misfit shows as failed tasks",
            options.experiment_id,
        )
    if not is_valid_segment(options.device_id):
        raise ServiceError(f"device id {options.device_id!r}: 1-128 letters, digits, '_' or '-'")
    enrollment = Enrollment(settings)  # no token: say so before a key is made
    with _only_process_with(options.key_file):
        identity, service_key = _enrolled(enrollment, options)
        with _serving(settings, options, x, y, enrollment, identity, service_key) as device:
            yield device


@contextmanager
def _only_process_with(key_file: Path) -> Iterator[None]:
    """Hold a lock beside the key file: a second process with the key refuses to start.

    Two would share the device's MQTT client id and take each other's
    connection over, again and again, without an error.
    """
    lock_path = key_file.with_name(key_file.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_path.open("a")
    except OSError as exc:
        raise ServiceError(f"cannot lock {lock_path}: {exc.strerror or exc}") from exc
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServiceError(
                f"another process runs the device of {key_file} (it holds {lock_path})"
            ) from None
        yield


def _enrolled(enrollment: Enrollment, options: EdgeOptions) -> tuple[Identity, bytes]:
    """Return the device's identity and the service key its enrollment answered with.

    A key file made here for an enrollment the service refused is removed again.
    """
    with key_file(options.key_file, options.device_id) as identity:
        return identity, enrollment(identity, "python")


@contextmanager
def _serving(
    settings: Settings,
    options: EdgeOptions,
    x: np.ndarray,
    y: np.ndarray,
    enrollment: Enrollment,
    identity: Identity,
    service_key: bytes,
) -> Iterator[DeviceClient]:
    """Run the enrolled device while the context lasts."""
    topics = settings.topics
    will = (
        topics.checkin(identity.name),
        encode(CheckOut(device_id=identity.name, reason="connection lost"), identity),
    )
    import torch

    # One intra-op thread, as in the fleet and the simulation: the float results of a
    # training then do not depend on how many cores the host has.
    torch.set_num_threads(1)
    app = DeviceApp()
    app.on_train(TorchScriptTrainer(x, y, seed=options.seed, stream=options.stream))
    with ExitStack() as stack:
        transports = TransportPool(settings.broker_url)
        stack.callback(transports.close)
        # Training runs off the connection's thread, one task at a time. At the end
        # the training in hand finishes and its update goes out before the device
        # checks out (the callbacks run last first): stopping loses no work. A task
        # arriving meanwhile is left unanswered, as a device switched off leaves it.
        executor = ThreadPoolExecutor(1, thread_name_prefix="fedmq-train")
        draining = threading.Event()
        submit = executor_runner(executor)

        def run(job: Callable[[], None]) -> None:
            if not draining.is_set():
                submit(job)

        def drain() -> None:
            draining.set()
            executor.shutdown(wait=True, cancel_futures=True)

        device = DeviceClient(
            app,
            transports(identity.name, will, enrollment.logins.get(identity.name)),
            identity,
            ArtifactFetcher(),
            service_key=service_key,
            topics=topics,
            platform="python",
            experiment_id=options.experiment_id,
            run=run,
            examples=len(x),
            heartbeat_s=options.heartbeat_s,
        )
        device.start()
        stack.callback(device.close)
        stack.callback(_print_totals, device)  # once the task in hand is answered
        stack.callback(drain)
        stack.callback(Ticker(device.check_in, interval_s=options.heartbeat_s).start().stop)
        print(
            f"fedmq device {identity.name}: {len(x)} examples on {redact(settings.broker_url)}",
            flush=True,
        )
        yield device


def run_edge_device(
    settings: Settings, options: EdgeOptions, *, health_file: Path | None = None
) -> None:
    """Run the device until signalled (see ``edge_device_running``)."""
    check_health_file(health_file)
    with edge_device_running(settings, options):
        wait_for_signal(health_file)


def _print_totals(device: DeviceClient) -> None:
    stats = device.stats
    totals = {"tasks": stats.tasks, "updates_sent": stats.updates_sent}
    totals |= {"failures": stats.failures, "rejections": len(stats.rejections)}
    print(f"fedmq device stopped: {totals}", flush=True)


def check_examples_fit(experiment: dict[str, Any], x: np.ndarray, y: np.ndarray) -> None:
    """Refuse examples the experiment's model cannot train on, before enrolling."""
    model = experiment["config"]["model"]
    shape, classes = tuple(model.get("input_shape", ())), int(model.get("num_classes", 0))
    # The service's own rule (ExperimentConfig): every zoo model but the CNN flattens
    # its input, so only the sizes must agree; the CNN needs the very shape.
    exact = model.get("zoo") == "mnist_cnn"
    fits = x.shape[1:] == shape if exact else math.prod(x.shape[1:]) == math.prod(shape)
    if shape and not fits:
        raise ServiceError(
            f"experiment {experiment['id']}'s model takes examples shaped {list(shape)}; "
            f"the data file's are {list(x.shape[1:])}"
        )
    if classes and int(y.max()) >= classes:
        raise ServiceError(
            f"experiment {experiment['id']}'s model has {classes} classes "
            f"(labels 0-{classes - 1}); the data file has label {int(y.max())}"
        )
