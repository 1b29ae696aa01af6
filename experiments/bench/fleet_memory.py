"""What an emulated device costs on the MQTT hub: memory, threads, files, connect time.

Run ``python -m experiments.bench.fleet_memory --devices 1000`` against the
local Mosquitto (``--broker`` for another). One process: the data set is
loaded and the hub started first (RSS before), then the fleet is built,
connected and started: every device subscribes and checks in (RSS after).
Memory per device is the difference over N; the trainers keep no examples, so
it is the device's own cost beyond model and data (keys, verifiers, the MQTT
session, its socket's bookkeeping). ``--per-device`` measures the old way
instead, a transport of its own per device (``broker.connect``), for
comparison at N <= 300. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import threading
import time
import uuid
from typing import Any

import numpy as np

from broker import TrainTask, Transport, connect
from broker.identity import SERVICE_NAME, Identity
from device_sdk import DeviceContext, TrainResult
from device_sdk.app import TrainHandler
from device_sdk.emulator.fleet import Fleet, fleet_transports
from fedmq.settings import load_settings

DEFAULT_BROKER = "mqtt://127.0.0.1:1883?session_expiry=60"
DATA_DIRS = load_settings({}).data_dirs
"""Where the data set files are: FEDMQ_DATA_DIR, then ../shared/data/mnist (the settings')."""


def rss() -> int:
    """Return this process's resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_files() -> int:
    """Return how many file descriptors this process holds."""
    return len(os.listdir("/proc/self/fd"))


def counting_trainers(x: np.ndarray, y: np.ndarray, index: int) -> TrainHandler:
    """Trivial local work that keeps no examples: hand the global weights back."""
    examples = len(x)

    def train(task: TrainTask, ctx: DeviceContext) -> TrainResult:
        return TrainResult(ctx.weights, examples, {"loss": 0.0})

    return train


def measure(broker: str, devices: int, dataset: str, per_device: bool) -> dict[str, Any]:
    """Build, connect and start ``devices`` devices; return the figures."""
    data = {"dataset": dataset, "devices": devices, "partition": "iid"}
    service_key = Identity.generate(SERVICE_NAME).public_key  # no service: a made-up key

    def enroll(identity: Identity, platform: str) -> bytes:
        return service_key

    pool = fleet_transports(broker, max_connecting=64)
    opened: list[Transport] = []

    def per_device_transport(client_id: str, will: tuple[str, bytes] | None) -> Transport:
        transport = connect(broker, client_id=client_id, will=will)
        opened.append(transport)
        return transport

    transport_for = per_device_transport if per_device else pool
    # Warm up: imports, the data set, one device's worth of lazily built state.
    Fleet(
        pool,
        data,
        seed=0,
        indices=range(0),
        make_trainer=counting_trainers,
        enroll=enroll,
        data_dir=DATA_DIRS,
    )
    gc.collect()
    time.sleep(0.5)
    before = {"rss": rss(), "threads": threading.active_count(), "fds": open_files()}

    started = time.monotonic()
    fleet = Fleet(
        transport_for,
        data,
        data_dir=DATA_DIRS,
        seed=0,
        make_trainer=counting_trainers,
        enroll=enroll,
        prefix=f"mem{uuid.uuid4().hex[:6]}",
    )
    built = time.monotonic()
    missing = pool.hub.wait_connected(timeout=600) if pool.hub is not None else 0
    connected = time.monotonic()
    fleet.start()
    online = time.monotonic()
    check_ins = _time_serial_check_ins(fleet)
    gc.collect()
    time.sleep(1.0)
    after = {"rss": rss(), "threads": threading.active_count(), "fds": open_files()}
    stopping = time.monotonic()
    fleet.stop()
    stopped = time.monotonic()
    pool.close()
    for transport in opened:
        transport.close()
    return {
        "transport": "per-device" if per_device else "hub",
        "devices": devices,
        "dataset": dataset,
        "not_connected": missing,
        "before": before,
        "after": after,
        "kib_per_device": (after["rss"] - before["rss"]) / devices / 1024,
        "threads_added": after["threads"] - before["threads"],
        "fds_added": after["fds"] - before["fds"],
        "build_s": built - started,
        "connect_s": connected - started,
        "start_s": online - connected,
        "serial_check_ins_s": check_ins,
        "stop_s": stopped - stopping,
    }


def _time_serial_check_ins(fleet: Fleet) -> float:
    """Return how long one heartbeat takes if every device checks in back to back."""
    started = time.monotonic()
    for device in fleet.devices:
        device.check_in()
    return time.monotonic() - started


def main() -> None:
    """Measure and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--broker", default=DEFAULT_BROKER)
    parser.add_argument(
        "--dataset", default=None, help="default: digits up to 1,000 devices, mnist above"
    )
    parser.add_argument("--per-device", action="store_true", help="a transport per device")
    args = parser.parse_args()
    dataset = args.dataset or ("digits" if args.devices <= 1000 else "mnist")
    result = measure(args.broker, args.devices, dataset, args.per_device)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
