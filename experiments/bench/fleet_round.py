"""A real round at fleet scale: service and worker as processes, the fleet on the MQTT hub.

Starts ``fedmq server`` and ``fedmq worker`` (children, logs in the work
folder) on the broker, creates an experiment whose devices do trivial local
work on a model of ``--params`` parameters, enrolls ``--devices`` devices over
REST, runs them in this process on one ``broker.mqtt_hub`` hub, and runs
``--rounds`` rounds of ``--cohort`` devices (default: all of them). Prints
one JSON object: setup times, each round's figures and duration, and this
process's threads, memory and open files.

Run ``python -m experiments.bench.fleet_round --devices 1000`` against the
local Mosquitto (``--broker`` for another). MNIST (for more devices than the
1,437 digits have examples) is found through ``FEDMQ_DATA_DIR`` or
``../shared/data``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from broker.identity import Identity, decode_public_key
from broker.topics import Topics
from device_sdk.data import search_path
from device_sdk.emulator.fleet import Fleet, fleet_transports
from experiments.bench.fleet_memory import DATA_DIRS, counting_trainers, open_files, rss

DEFAULT_BROKER = "mqtt://127.0.0.1:1883?session_expiry=120"


class Service:
    """The ``fedmq server`` and ``fedmq worker`` children and a REST client of the server."""

    def __init__(self, workdir: Path, broker: str, namespace: str) -> None:
        self.workdir = workdir
        self.port = _free_port()
        self.token = secrets.token_urlsafe(16)
        self.env = {
            **os.environ,
            "FEDMQ_HOME": str(workdir / "home"),
            "FEDMQ_KEYS": str(workdir / "home" / "keys"),
            "FEDMQ_BROKER_URL": broker,
            "FEDMQ_STORE_URL": (workdir / "store").as_uri(),
            "FEDMQ_DB_URL": f"sqlite:///{workdir / 'fedmq.db'}",
            "FEDMQ_SERVER_URL": f"http://127.0.0.1:{self.port}",
            "FEDMQ_NAMESPACE": namespace,
            "FEDMQ_ADMIN_TOKEN": self.token,
            "FEDMQ_DATA_DIR": os.path.abspath(next(d for d in DATA_DIRS if d)),
            "PYTHONUNBUFFERED": "1",
        }
        self.children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        """Start the server, wait for it, then the worker (it pins the service's key)."""
        self._spawn("server", "server", "--port", str(self.port))
        self._wait(lambda: self._healthy(), 60, "the server")
        self._spawn("worker", "worker", "--name", f"bench-{uuid.uuid4().hex[:6]}")
        self._wait(lambda: "fedmq worker on" in self.log("worker"), 60, "the worker")

    def stop(self) -> None:
        """Terminate the children (SIGTERM, then SIGKILL)."""
        for proc in self.children.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.children.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Call the REST API; return the decoded JSON answer."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/v1{path}",
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def log(self, name: str) -> str:
        """Return what a child printed so far."""
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def cpu_s(self, name: str) -> float:
        """Return the CPU seconds a child used so far."""
        with open(f"/proc/{self.children[name].pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self, name: str) -> float:
        """Return a child's resident memory in MiB."""
        with open(f"/proc/{self.children[name].pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.children[name] = subprocess.Popen(
            [sys.executable, "-m", "fedmq", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
        )

    def _healthy(self) -> bool:
        try:
            return bool(self.call("GET", "/health") == {"status": "ok"})
        except OSError:
            return False

    def _wait(self, condition: Any, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return
            for name, proc in self.children.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{what} did not come up")


def experiment_config(devices: int, cohort: int, params: int, rounds: int) -> dict[str, Any]:
    """Return an experiment of ``devices`` devices and a model of about ``params`` parameters."""
    digits = devices <= 1437
    inputs = 64 if digits else 784
    return {
        "name": f"fleet-round-{devices}",
        "seed": 7,
        "model": {
            "zoo": "mlp",
            "input_shape": [64] if digits else [1, 28, 28],
            "num_classes": 10,
            "hidden": [max(1, (params - 10) // (inputs + 11))],
        },
        "data": {
            "dataset": "digits" if digits else "mnist",
            "devices": devices,
            "partition": "iid",
        },
        "rounds": {
            "count": rounds,
            "devices_per_round": cohort,
            "over_selection": 1.0,
            "min_reports": cohort,
            "deadline_s": 600.0,
        },
        "training": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.05},
    }


def enroll_all(service: Service, identities: list[Identity], threads: int = 8) -> bytes:
    """Register every device over REST, a few at a time; return the service key."""

    def enroll(identity: Identity) -> bytes:
        body = {
            "platform": "emulated",
            "public_key": identity.public_key_text,
            "device_id": identity.name,
        }
        return decode_public_key(str(service.call("POST", "/devices", body)["service_key"]))

    with ThreadPoolExecutor(threads) as pool:
        keys = set(pool.map(enroll, identities))
    if len(keys) != 1:
        raise RuntimeError("the service answered with different keys")
    return keys.pop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Set up, run the rounds, tear down; return the figures."""
    namespace = f"bench{uuid.uuid4().hex[:6]}"
    cohort = args.cohort or args.devices
    figures: dict[str, Any] = {"devices": args.devices, "cohort": cohort, "params": args.params}
    with tempfile.TemporaryDirectory(prefix="fleet-round-") as folder:
        service = Service(Path(folder), args.broker, namespace)
        pool = fleet_transports(args.broker, workers=args.workers)
        training = ThreadPoolExecutor(args.workers, thread_name_prefix="fedmq-train")
        fleet: Fleet | None = None
        try:
            service.start()
            config = experiment_config(args.devices, cohort, args.params, args.rounds)
            experiment_id = service.call("POST", "/experiments", config)["id"]
            fleet = _online_fleet(
                service, pool, training, config, experiment_id, namespace, figures
            )
            cpu = _cpu(service)
            figures["rounds"] = _rounds(service, experiment_id, args.rounds)
            figures["cpu_s_during_rounds"] = {k: v - cpu[k] for k, v in _cpu(service).items()}
            figures["fleet_process"] = {
                "threads": threading.active_count(),
                "rss_mib": rss() / 2**20,
                "open_files": open_files(),
            }
            figures["server_rss_mib"] = service.rss_mib("server")
            figures["worker_rss_mib"] = service.rss_mib("worker")
            figures["fleet_summary"] = fleet.summary()
        finally:
            if fleet is not None:
                fleet.stop()
            training.shutdown(wait=False, cancel_futures=True)
            pool.close()
            service.stop()
    return figures


def _online_fleet(
    service: Service,
    pool: Any,
    training: ThreadPoolExecutor,
    config: dict[str, Any],
    experiment_id: str,
    namespace: str,
    figures: dict[str, Any],
) -> Fleet:
    """Enroll, build, connect and start the fleet; wait until the service has every check-in."""
    devices = int(config["data"]["devices"])
    prefix = f"r{uuid.uuid4().hex[:5]}"
    started = time.monotonic()
    identities = [Identity.generate(f"{prefix}-{i:04d}") for i in range(devices)]
    service_key = enroll_all(service, identities)
    enrolled = time.monotonic()
    by_name = {identity.name: identity for identity in identities}
    with search_path([d for d in DATA_DIRS if d]):
        fleet = Fleet(
            pool,
            config["data"],
            seed=int(config["seed"]),
            experiment_id=experiment_id,
            run=lambda job: training.submit(job) and None,
            prefix=prefix,
            make_trainer=counting_trainers,
            enroll=lambda identity, platform: service_key,
            topics=Topics(namespace),
            identities=by_name.__getitem__,
        )
    built = time.monotonic()
    fleet.start(heartbeat_s=30.0)
    online = time.monotonic()
    service._wait(lambda: _checked_in(service) >= devices, 600, "every check-in")
    seen = time.monotonic()
    figures["setup_s"] = {
        "enroll": enrolled - started,
        "build_and_connect": built - enrolled,
        "start": online - built,
        "service_saw_all": seen - built,
    }
    return fleet


def _cpu(service: Service) -> dict[str, float]:
    """Return the CPU seconds used so far by the fleet (this process), the server and the worker."""
    times = os.times()
    return {
        "fleet": times.user + times.system,
        "server": service.cpu_s("server"),
        "worker": service.cpu_s("worker"),
    }


def _checked_in(service: Service) -> int:
    try:
        listing = service.call("GET", "/devices")
    except OSError:
        return 0
    return sum(1 for d in listing["devices"] if d.get("last_seen"))


def _rounds(service: Service, experiment_id: str, count: int) -> list[dict[str, Any]]:
    """Run ``count`` rounds; return each one's figures (round lists left out)."""
    began = time.monotonic()
    service.call("POST", f"/experiments/{experiment_id}/rounds", {"count": count})

    def done() -> bool:
        try:
            rounds = service.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
        except OSError:  # a server busy with a 10,000-device round answers late
            return False
        return sum(1 for r in rounds if r["state"] != "training") >= count

    service._wait(done, 1800, f"{count} rounds")
    wall = time.monotonic() - began
    rounds = service.call("GET", f"/experiments/{experiment_id}/rounds")["rounds"]
    keep = ("round", "state", "selected", "reported", "accepted", "rejected", "duration_s")
    out = [{k: r.get(k) for k in keep if not isinstance(r.get(k), list)} for r in rounds]
    for r, raw in zip(out, rounds, strict=True):
        for k in ("selected", "reported", "accepted"):
            if isinstance(raw.get(k), list):
                r[k] = len(raw[k])
    return [*out, {"wall_s_all_rounds": wall}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    """Parse the arguments, run, print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--cohort", type=int, default=0, help="devices per round (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--broker", default=DEFAULT_BROKER)
    parser.add_argument("--workers", type=int, default=4, help="hub lane and training threads")
    args = parser.parse_args()
    print(json.dumps(run(args), default=str), flush=True)


if __name__ == "__main__":
    main()
